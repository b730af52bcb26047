"""Exact weight transfer from a strided conv or pool to its SPD + stride-1 conv replacement.

Along each spatial axis, :func:`~spd_rewrite.ops.geometry.plan_axis` maps original tap ``t`` to a
block index ``j`` of the stride-1 kernel and a phase ``r`` of the space-to-depth (SPD) tensor. The
stride-1 weight is the original weight scattered to those places, with zeros everywhere else, so
``conv(spd(x), spd_conv_weight(w), padding=layout.padding)`` equals ``conv(x, w, stride=s, ...)``
for every input size. The N-d scatter is the product of the per-axis ones.

Channel orders (see :mod:`spd_rewrite.ops.space_to_depth`), with ``S = prod(scale)``:

* ``"unshuffle"``: SPD channel ``c*S + phase``, phase row-major over the spatial axes;
* ``"reference"``: SPD channel ``phase*C + c``, phase with the first spatial axis varying fastest.

No torch.fx here: plain tensors in, plain tensors out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from spd_rewrite.errors import WeightTransferError
from spd_rewrite.ops.geometry import AxisLayout, WindowAxis
from spd_rewrite.ops.space_to_depth import ChannelOrder

__all__ = [
    "avg_pool_divisor_is_constant",
    "avg_pool_weight_divisor",
    "spd_avg_pool_weight",
    "spd_conv_weight",
    "spd_max_pool_init_weight",
]

_TAP_LETTERS = "ijk"
_PHASE_LETTERS = "lmn"
_BLOCK_LETTERS = "xyz"


def spd_conv_weight(
    weight: torch.Tensor,
    layouts: Sequence[AxisLayout],
    groups: int = 1,
    order: ChannelOrder = "unshuffle",
) -> torch.Tensor:
    """Scatter a strided conv weight into the stride-1 conv weight that reads the SPD tensor.

    Args:
        weight: the original weight ``(O, C/groups, *k)`` with 1, 2 or 3 spatial axes.
        layouts: one layout per spatial axis, planned for this conv's kernel, stride, padding
            and dilation.
        groups: the conv's groups. The stride-1 conv keeps them (order ``"unshuffle"`` only).
        order: the channel order of the SPD layer in front of the stride-1 conv.

    Returns:
        The weight ``(O, C*S/groups, *K')``, ``K'`` being ``layout.kernel`` per axis, in the
        dtype and on the device of ``weight``. The bias of the original conv carries over as is.

    Raises:
        WeightTransferError: a layout does not hold every tap (a compact kernel that is too
            small), the layouts do not match the weight, or ``groups > 1`` with order
            ``"reference"``.
    """
    _check_order(order)
    _check_layouts(weight, layouts)
    if groups < 1 or weight.shape[0] % groups != 0:
        raise WeightTransferError(
            f"groups must be a positive divisor of the {weight.shape[0]} output channels, "
            f"got {groups}"
        )
    if order == "reference" and groups > 1:
        raise WeightTransferError(
            f"a conv with groups={groups} cannot keep its groups after an SPD layer with order "
            f"'reference', because that order separates the phases of one channel; "
            f"use order 'unshuffle'"
        )
    return _scatter_taps(weight, layouts, order, skip_missing=False)


def spd_avg_pool_weight(
    channels: int,
    kernel: int | Sequence[int],
    layouts: Sequence[AxisLayout],
    divisor: float,
    order: ChannelOrder = "unshuffle",
    *,
    depthwise: bool = False,
) -> torch.Tensor:
    """Build the stride-1 conv weight that computes an average pool from the SPD tensor.

    Output channel ``c`` sums the taps of its own input channel, each weighted ``1/divisor``.

    Args:
        channels: the pool's channels ``C``.
        kernel: the pool's kernel, one size or one per spatial axis.
        layouts: one layout per spatial axis, planned for the pool.
        divisor: the pool's divisor when it is the same at every output position, see
            :func:`avg_pool_weight_divisor`. Otherwise pass that function's value and put
            :class:`~spd_rewrite.ops.avg_pool_divisor.AvgPoolDivisorCorrection` after the conv.
        order: the channel order of the SPD layer in front of the conv.
        depthwise: return the weight ``(C, S, *K')`` of a conv with ``groups=C`` (order
            ``"unshuffle"`` only) in place of the dense ``(C, C*S, *K')`` one.

    Returns:
        A float32 weight ``(C, C*S, *K')`` for a conv with ``groups=1`` and no bias, or
        ``(C, S, *K')`` with ``depthwise=True``.

    Raises:
        WeightTransferError: as :func:`spd_conv_weight`.
    """
    kernel = _expand(kernel, len(layouts), "kernel")
    if divisor == 0:
        raise WeightTransferError("the average-pool divisor must not be 0")

    if depthwise:
        # (C, 1, *k): every output channel reads only its own input channel.
        taps = torch.full((channels, 1, *kernel), 1.0 / divisor)
        return spd_conv_weight(taps, layouts, groups=channels, order=order)

    # (C, C, *k), identity over channels: output channel c reads only input channel c.
    taps = torch.zeros(channels, channels, *kernel)
    taps[torch.arange(channels), torch.arange(channels)] = 1.0 / divisor
    return spd_conv_weight(taps, layouts, groups=1, order=order)


def spd_max_pool_init_weight(
    channels: int,
    layouts: Sequence[AxisLayout],
    order: ChannelOrder = "unshuffle",
) -> torch.Tensor:
    """Build a starting weight for a learned stride-1 conv that replaces a max pool.

    A conv cannot compute a max, so this is an approximation to be trained further: output
    channel ``c`` starts as the mean of the taps of its own channel that the original window
    covers, i.e. the weight of an average pool with the max pool's kernel, stride, padding and
    dilation. The SPD layer in front of this conv pads with zeros, not ``-inf``, so windows that
    overlap the padding average in zeros where the max pool ignored them.

    Unlike :func:`spd_conv_weight`, a compact kernel that cannot hold every tap is accepted: the
    taps that fall outside it are left out and the mean is taken over the ones that remain.

    Returns:
        A float32 weight ``(C, C*S, *K')`` for a conv with ``groups=1`` and no bias.
    """
    _check_order(order)
    kernel = tuple(len(layout.taps) for layout in layouts)
    placed = math.prod(
        sum(0 <= block < layout.kernel for block, _ in layout.taps) for layout in layouts
    )
    if placed == 0:
        raise WeightTransferError(
            f"the stride-1 kernel {tuple(layout.kernel for layout in layouts)} contains none "
            f"of the max pool's taps; use a larger kernel"
        )

    # (C, C, *k), identity over channels with the mean over the taps that fit in the kernel.
    taps = torch.zeros(channels, channels, *kernel)
    taps[torch.arange(channels), torch.arange(channels)] = 1.0 / placed
    return _scatter_taps(taps, layouts, order, skip_missing=True)


def avg_pool_weight_divisor(kernel: Sequence[int], divisor_override: int | None = None) -> int:
    """Return the average-pool weight's divisor: ``divisor_override``, else ``prod(kernel)``."""
    if divisor_override:
        return divisor_override
    return math.prod(kernel)


def avg_pool_divisor_is_constant(
    axes: Sequence[WindowAxis],
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> bool:
    """Check whether an average pool divides every output by one number, for every input size.

    PyTorch divides each window sum by ``divisor_override`` when given. Otherwise it divides by
    the window's size clipped to ``[-padding, size + padding)`` with ``count_include_pad``, or
    clipped to the input ``[0, size)`` without it. The divisor then varies over the output when:

    * ``count_include_pad`` is false and some axis has padding (the border windows are smaller);
    * ``ceil_mode`` is on, the stride is 2 or more and ``kernel - padding >= 2``: for some input
      sizes the last window runs past the right padding and PyTorch clips it.

    When this returns false, the stride-1 conv with :func:`avg_pool_weight_divisor` must be
    followed by :class:`~spd_rewrite.ops.avg_pool_divisor.AvgPoolDivisorCorrection`.
    """
    if divisor_override:
        return True
    for axis in axes:
        if not count_include_pad and axis.padding > 0:
            return False
        # The last ceil-mode window overhangs by stride - (size + 2p - k) % stride elements, and
        # PyTorch keeps it only while it starts inside the input, i.e. overhang < k - p.
        if axis.ceil_mode and axis.stride >= 2 and axis.kernel - axis.padding >= 2:
            return False
    return True


def _scatter_taps(
    weight: torch.Tensor,
    layouts: Sequence[AxisLayout],
    order: ChannelOrder,
    skip_missing: bool,
) -> torch.Tensor:
    """Scatter ``weight`` (O, Cg, *k) to (O, Cg*S, *K') in the SPD channel order."""
    spatial = len(layouts)
    out_channels, group_channels = weight.shape[:2]

    # One 0/1 matrix per axis: (k, s, K'), entry [t, r, j] = 1 when tap t goes to phase r, block j.
    scatters = []
    for layout in layouts:
        matrix = weight.new_zeros(len(layout.taps), layout.scale, layout.kernel)
        for tap, (block, phase) in enumerate(layout.taps):
            if skip_missing and not 0 <= block < layout.kernel:
                continue
            matrix[tap, phase, block] = 1
        scatters.append(matrix)

    taps = _TAP_LETTERS[:spatial]
    phases = _PHASE_LETTERS[:spatial]
    blocks = _BLOCK_LETTERS[:spatial]
    operands = ["oc" + taps] + [t + p + b for t, p, b in zip(taps, phases, blocks, strict=True)]
    if order == "unshuffle":
        # (O, Cg, s1, ..., sn, K'1, ..., K'n): flattening (c, s1, ..., sn) row-major gives
        # channel = c*S + row-major phase index.
        result = "oc" + phases + blocks
    else:
        # (O, sn, ..., s1, C, K'1, ..., K'n): flattening (sn, ..., s1, c) row-major gives
        # channel = phase index (first axis fastest)*C + c.
        result = "o" + phases[::-1] + "c" + blocks
    scattered = torch.einsum(",".join(operands) + "->" + result, weight, *scatters)

    spd_channels = group_channels * math.prod(layout.scale for layout in layouts)
    new_kernel = [layout.kernel for layout in layouts]
    return scattered.reshape(out_channels, spd_channels, *new_kernel)


def _check_layouts(weight: torch.Tensor, layouts: Sequence[AxisLayout]) -> None:
    spatial = weight.dim() - 2
    if spatial not in (1, 2, 3):
        raise WeightTransferError(
            f"expected a conv weight (O, C/groups, *kernel) with 1, 2 or 3 spatial axes, "
            f"got shape {tuple(weight.shape)}"
        )
    if len(layouts) != spatial:
        raise WeightTransferError(
            f"a weight with {spatial} spatial axes needs {spatial} layouts, got {len(layouts)}"
        )
    for axis, layout in enumerate(layouts):
        if len(layout.taps) != weight.shape[2 + axis]:
            raise WeightTransferError(
                f"the layout of spatial axis {axis} has {len(layout.taps)} taps but the kernel "
                f"has {weight.shape[2 + axis]}; plan the layout for this conv's kernel"
            )
        if not layout.fits_taps:
            raise WeightTransferError(
                f"the stride-1 kernel size {layout.kernel} of spatial axis {axis} cannot hold "
                f"every tap, so the weights cannot be carried over exactly; use "
                f'kernel = "compact" (the smallest kernel that holds every tap)'
            )


def _check_order(order: str) -> None:
    if order not in ("unshuffle", "reference"):
        raise WeightTransferError(f"order must be 'unshuffle' or 'reference', got {order!r}")


def _expand(value: int | Sequence[int], spatial: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * spatial
    value = tuple(value)
    if len(value) != spatial:
        raise WeightTransferError(
            f"{name} must have one entry per spatial axis ({spatial}), got {value}"
        )
    return value
