"""The exact, stride-free replacement of a max pool that reads a space-to-depth tensor.

A max pool with stride ``s`` reads, along each axis, the taps that
:func:`~spd_rewrite.ops.geometry.plan_axis` maps to (block offset ``j``, phase ``r``) pairs. After a
:class:`~spd_rewrite.ops.space_to_depth.SpaceToDepth` layer with the same scale and
``pad_value=-inf``, the original window of output ``i`` is the set of elements
``spd[channel (c, r), i + j]`` over the taps, so the pool becomes a running elementwise maximum
of one shifted slice per tap. No torch.fx here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spd_rewrite.ops.geometry import AxisLayout
from spd_rewrite.ops.space_to_depth import ChannelOrder

__all__ = ["PhaseMax"]


class PhaseMax(nn.Module):
    """Maximum over the (phase, block offset) pairs that a max pool window covers.

    Input: the SPD tensor ``(N, C*S, *blocks)``, made with ``pad_value=-inf`` and the layouts'
    ``pad_before`` and ``block_offset``. Output: ``(N, C, *out)`` with
    ``out = blocks + 2*padding - kernel + 1`` per axis, equal to the max pool's output.

    Args:
        layouts: one layout per spatial axis, planned for the pool's kernel, stride, padding,
            dilation and ceil mode; each must hold every tap (``fits_taps``).
        channels: the pool's channels ``C``.
        order: the channel order of the SPD layer in front.
    """

    def __init__(
        self,
        layouts: Sequence[AxisLayout],
        channels: int,
        order: ChannelOrder = "unshuffle",
    ) -> None:
        super().__init__()
        layouts = tuple(layouts)
        if len(layouts) not in (1, 2, 3):
            raise ValueError(f"PhaseMax supports 1, 2 or 3 spatial axes, got {len(layouts)}")
        if order not in ("unshuffle", "reference"):
            raise ValueError(f"order must be 'unshuffle' or 'reference', got {order!r}")
        for axis, layout in enumerate(layouts):
            if not layout.fits_taps:
                raise ValueError(
                    f"the stride-1 kernel size {layout.kernel} of spatial axis {axis} cannot hold "
                    f"every tap of the max pool; plan the layout with kernel=None"
                )

        self.channels = int(channels)
        self.scale = tuple(layout.scale for layout in layouts)
        self.kernel = tuple(layout.kernel for layout in layouts)
        self.padding = tuple(layout.padding for layout in layouts)
        self.order: ChannelOrder = order
        # One (phase index, block offsets) pair per tap of the original window.
        self.taps = tuple(
            (self._phase_index(tuple(r for _, r in combo)), tuple(j for j, _ in combo))
            for combo in itertools.product(*(layout.taps for layout in layouts))
        )

    def _phase_index(self, phases: tuple[int, ...]) -> int:
        index = 0
        if self.order == "unshuffle":
            # Row-major: the last spatial axis varies fastest.
            for phase, scale in zip(phases, self.scale, strict=True):
                index = index * scale + phase
        else:
            # The first spatial axis varies fastest.
            for phase, scale in zip(reversed(phases), reversed(self.scale), strict=True):
                index = index * scale + phase
        return index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = len(self.scale)
        phase_count = math.prod(self.scale)
        if x.dim() != spatial + 2 or x.shape[1] != self.channels * phase_count:
            raise ValueError(
                f"PhaseMax expects an SPD tensor (N, {self.channels * phase_count}, "
                f"*{spatial} block axes), got shape {tuple(x.shape)}"
            )

        # Pad every block axis with -inf, last axis first as F.pad expects.
        pads: list[int] = []
        for padding in reversed(self.padding):
            pads += [padding, padding]
        if any(pads):
            x = F.pad(x, pads, value=float("-inf"))

        blocks = x.shape[2:]
        out = [size - kernel + 1 for size, kernel in zip(blocks, self.kernel, strict=True)]
        if any(size < 1 for size in out):
            raise ValueError(
                f"the SPD tensor of shape {tuple(x.shape)} is too small for kernel {self.kernel}"
            )

        n = x.shape[0]
        if self.order == "unshuffle":
            # (N, C, S, *blocks): channel = c*S + phase.
            x = x.reshape(n, self.channels, phase_count, *blocks)
        else:
            # (N, S, C, *blocks): channel = phase*C + c.
            x = x.reshape(n, phase_count, self.channels, *blocks)

        result: torch.Tensor | None = None
        for phase, offsets in self.taps:
            plane = x[:, :, phase] if self.order == "unshuffle" else x[:, phase]
            window = tuple(
                slice(offset, offset + size) for offset, size in zip(offsets, out, strict=True)
            )
            shifted = plane[(slice(None), slice(None), *window)]
            result = shifted if result is None else torch.maximum(result, shifted)
        assert result is not None  # every layout has at least one tap
        return result

    def extra_repr(self) -> str:
        parts = [
            f"channels={self.channels}",
            f"scale={self.scale}",
            f"kernel={self.kernel}",
            f"padding={self.padding}",
            f"taps={len(self.taps)}",
        ]
        if self.order != "unshuffle":
            parts.append(f"order={self.order!r}")
        return ", ".join(parts)
