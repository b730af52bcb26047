"""The fused execution form of an ``SPDConv`` block: one strided conv on the original input.

Space-to-depth with scale ``s`` followed by a stride-1 conv with kernel ``K`` and zero padding
``P`` computes the same function as one conv with kernel ``s*K``, stride ``s`` and padding ``s*P``
on the input itself. Along one axis, tap ``k`` of output ``i`` reads block ``i + k - P`` at
phase ``r``, which is input element ``s*(i + k - P) + r``. That element is tap ``t = s*k + r`` of a
stride-``s`` conv padded by ``s*P``. The Focus layer and YOLOv5's 6x6 stride-2 stem are this pair.

The SPD layer's ``pad_before`` adds to the fused conv's left padding. Its end padding or crop (set
by ``block_offset``) depends on the input size modulo ``s``. Where it leaves the windows unchanged,
the conv pads both sides by the left amount. Otherwise (odd sizes under a rounding-up SPD layer,
for example) :class:`FusedSPDConv` applies the SPD layer's padding with ``F.pad`` first and pads the
conv by ``s*P`` only.

A fused model has strided convs again. It is an execution form of the same function, not a
different architecture: the rewrite report, and its ``downsampling_left``, describe the SPD model.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spd_rewrite.ops.blocks import SPDConv
from spd_rewrite.ops.space_to_depth import SpaceToDepth, space_to_depth

__all__ = ["FusedSPDConv", "FusionRecord", "fuse_spd_conv", "fuse_spd_convs", "fusion_records"]

logger = logging.getLogger(__name__)

_CONV_TYPES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# Bound of the per-block check, relative to the largest output magnitude, run in float64.
_CHECK_RTOL = 1e-9
# In measure mode a fused block replaces its SPDConv only when it is at least 5% faster, so that
# timing noise does not flip blocks whose two forms run equally fast.
_MIN_SPEEDUP = 1.05


class FusedSPDConv(nn.Module):
    """A strided conv that computes what ``SPDConv(spd, conv)`` computes.

    ``conv`` has kernel ``scale * kernel``, stride ``scale`` and padding ``scale * padding +
    pad_before`` per axis, the original conv's ``padding`` and the SPD layer's ``pad_before``.
    Where an input size makes the SPD layer crop the end, or pad it by more than that, ``forward``
    applies the SPD layer's padding with ``F.pad`` and pads the conv by ``scale * padding`` only.
    """

    def __init__(
        self,
        conv: nn.Module,
        scale: Sequence[int],
        padding: Sequence[int],
        pad_before: Sequence[int],
        block_offset: Sequence[int],
    ) -> None:
        super().__init__()
        self.conv = conv
        self.scale = tuple(int(s) for s in scale)
        self.padding = tuple(int(p) for p in padding)
        self.pad_before = tuple(int(p) for p in pad_before)
        self.block_offset = tuple(int(o) for o in block_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        conv_padding: list[int] = []
        for axis, size in enumerate(x.shape[2:]):
            explicit, padding = self._axis_padding(axis, size)
            pads = [*explicit, *pads]  # F.pad lists the last axis first
            conv_padding.append(padding)
        if any(pads):
            x = F.pad(x, pads)
        conv = self.conv
        return _CONV_FUNCTIONS[len(self.scale)](
            x, conv.weight, conv.bias, conv.stride, conv_padding, 1, conv.groups
        )

    def _axis_padding(self, axis: int, size: int) -> tuple[tuple[int, int], int]:
        """Return the ``F.pad`` amounts (before, after) and the conv padding along one axis."""
        scale, before = self.scale[axis], self.pad_before[axis]
        conv_padding = scale * self.padding[axis]
        left = conv_padding + before

        # The SPD layer keeps `kept` elements after prepending `before` zeros (padding or cropping
        # the end), and the stride-1 conv reads `length` elements of block padding plus data.
        blocks = (size + self.block_offset[axis]) // scale
        kept = blocks * scale - before
        length = blocks * scale + 2 * conv_padding
        right = length - left - size
        # Symmetric conv padding `left` reads the same elements when nothing is cropped and the
        # padded length is `length` plus less than one stride (the extra elements are never read).
        if kept >= size and right <= left < right + scale:
            return (0, 0), left
        return (before, kept - size), conv_padding

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, padding={self.padding}, pad_before={self.pad_before}, "
            f"block_offset={self.block_offset}"
        )


@dataclass(frozen=True)
class FusionRecord:
    """The decision :func:`fuse_spd_convs` made for one ``SPDConv`` block, with both timings."""

    name: str
    fused: bool
    reason: str
    block_seconds: float | None = None
    fused_seconds: float | None = None


def fuse_spd_conv(block: SPDConv) -> FusedSPDConv:
    """Build the strided conv equivalent to ``block`` (weights copied, not shared).

    Raises:
        ValueError: the block has no exact single-conv form: an average-pool divisor correction,
            a non-zero SPD pad value, a conv that is strided, dilated, not zero-padded or not a
            ``torch.nn.ConvNd``.
    """
    spd, conv = block.spd, block.conv
    _check_fusable(block)
    dims = spd.dims
    scale = spd.scale
    kernel = tuple(conv.kernel_size)
    padding = tuple(conv.padding)

    # (C, s1, ..., sd) -> the SPD output channel of input channel c at phase (r1, ..., rd).
    channels = conv.in_channels // math.prod(scale)
    source = _spd_channel_map(channels, scale, spd.order)

    # Dense weight (O, C*S, K...) with zeros outside each group's block.
    dense = _dense_weight(conv.weight.detach(), conv.groups)
    out_channels = dense.shape[0]

    # (O, C, s1, ..., sd, K1, ..., Kd), then interleave each phase into its kernel axis:
    # (O, C, K1, s1, ..., Kd, sd) -> (O, C, K1*s1, ..., Kd*sd), tap t = s*k + r.
    gathered = dense[:, source.flatten()].reshape(out_channels, channels, *scale, *kernel)
    order = [0, 1]
    for axis in range(dims):
        order += [2 + dims + axis, 2 + axis]
    fused_kernel = tuple(k * s for k, s in zip(kernel, scale, strict=True))
    weight = gathered.permute(order).reshape(out_channels, channels, *fused_kernel)

    # Keep as many groups as the (phase-merged) connectivity allows.
    connected = _dense_weight(torch.ones_like(conv.weight[:, :, *(0,) * dims]), conv.groups)
    connected = connected[:, source.flatten()].reshape(out_channels, channels, -1).any(-1)
    groups = _largest_groups(connected)
    weight = _block_diagonal(weight, groups)

    left = tuple(s * p + b for s, p, b in zip(scale, padding, spd.pad_before, strict=True))
    fused_conv = _CONV_TYPES[dims](
        channels,
        out_channels,
        fused_kernel,
        stride=scale,
        padding=left,
        groups=groups,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        fused_conv.weight.copy_(weight)
        if conv.bias is not None:
            fused_conv.bias.copy_(conv.bias)
    fused = FusedSPDConv(fused_conv, scale, padding, spd.pad_before, spd.block_offset)
    fused.train(block.training)
    return fused


def fuse_spd_convs(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[Any] | None = None,
    *,
    force: bool = False,
    repeats: int = 20,
) -> tuple[nn.Module, list[str]]:
    """Replace the ``SPDConv`` blocks of a copy of ``model`` by :class:`FusedSPDConv`.

    Every fused block is checked against its ``SPDConv`` on a random input in float64. With
    ``force`` every block that has a fused form is fused. Otherwise both forms of each block are
    timed on the input shape that ``example_inputs`` gives it, in the model's dtype and device, and
    the fused form is kept only where it is faster.

    Args:
        model: the model (typically a ``rewrite`` result); it is copied, never modified.
        example_inputs: one tensor or a sequence of positional inputs; required unless ``force``.
        force: fuse every fusable block without measuring.
        repeats: timed calls per form and block in measure mode.

    Returns:
        The copy with fused blocks, and the qualified names of the blocks that were fused.
        :func:`fusion_records` lists the decision for every block.

    Raises:
        ValueError: ``example_inputs`` is missing and ``force`` is false.
        RuntimeError: a fused block does not reproduce its ``SPDConv`` (a bug).
    """
    fused_model, records = fusion_records(model, example_inputs, force=force, repeats=repeats)
    return fused_model, [record.name for record in records if record.fused]


def fusion_records(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[Any] | None = None,
    *,
    force: bool = False,
    repeats: int = 20,
) -> tuple[nn.Module, list[FusionRecord]]:
    """Run :func:`fuse_spd_convs` and return a :class:`FusionRecord` per ``SPDConv`` block."""
    if example_inputs is None and not force:
        raise ValueError(
            "fuse_spd_convs needs example_inputs to time each block; pass them, or pass "
            "force=True to fuse every fusable block"
        )
    working = copy.deepcopy(model)
    blocks = [(name, m) for name, m in working.named_modules() if isinstance(m, SPDConv)]
    block_inputs = {} if force else _block_inputs(working, blocks, example_inputs)

    records = []
    for name, block in blocks:
        try:
            fused = fuse_spd_conv(block)
        except ValueError as error:
            records.append(FusionRecord(name, False, str(error)))
            logger.debug("not fusing %s: %s", name, error)
            continue
        _check_equal(name, block, fused)

        record = FusionRecord(name, True, "forced")
        if not force:
            x = block_inputs.get(name)
            if x is None:
                records.append(FusionRecord(name, False, "the example input never reaches it"))
                continue
            block_time = _time_call(block, x, repeats)
            fused_time = _time_call(fused, x, repeats)
            faster = fused_time * _MIN_SPEEDUP < block_time
            reason = "fused form is faster" if faster else "SPD form is as fast or faster"
            record = FusionRecord(name, faster, reason, block_time, fused_time)
        records.append(record)
        if record.fused:
            _set_submodule(working, name, fused)

    logger.info("fused %d of %d SPDConv blocks", sum(r.fused for r in records), len(records))
    return working, records


def _check_fusable(block: SPDConv) -> None:
    spd, conv = block.spd, block.conv
    if block.correction is not None:
        raise ValueError("the block rescales its output per position (average-pool divisor)")
    if not isinstance(spd, SpaceToDepth) or type(conv) is not _CONV_TYPES.get(spd.dims):
        raise ValueError(f"the block's conv is a {type(conv).__name__}, not a torch.nn.ConvNd")
    if spd.pad_value != 0.0:
        raise ValueError(f"the SPD layer pads with {spd.pad_value}, not zeros")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"the conv has padding {conv.padding!r} ({conv.padding_mode})")
    if any(s != 1 for s in conv.stride):
        raise ValueError(f"the conv has stride {tuple(conv.stride)}")
    if any(d != 1 for d in conv.dilation):
        raise ValueError(f"the conv has dilation {tuple(conv.dilation)}")


def _spd_channel_map(channels: int, scale: tuple[int, ...], order: str) -> torch.Tensor:
    """Return a (C, s1, ..., sd) tensor: the SPD output channel of each channel and phase."""
    # Label every element of one block by its (channel, phase) index, run the SPD layer on it and
    # read the labels back per output channel.
    phases = math.prod(scale)
    labels = torch.arange(channels * phases, dtype=torch.float64).reshape(1, channels, *scale)
    out = space_to_depth(labels, scale, order=order).flatten().long()
    source = torch.empty_like(out)
    source[out] = torch.arange(out.numel())
    return source.reshape(channels, *scale)


def _dense_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Expand a grouped conv weight (O, I/g, ...) to (O, I, ...) with zeros between groups."""
    out_channels, per_group = weight.shape[:2]
    if groups == 1:
        return weight
    dense = weight.new_zeros(out_channels, per_group * groups, *weight.shape[2:])
    rows = out_channels // groups
    for group in range(groups):
        dense[group * rows : (group + 1) * rows, group * per_group : (group + 1) * per_group] = (
            weight[group * rows : (group + 1) * rows]
        )
    return dense


def _largest_groups(connected: torch.Tensor) -> int:
    """Return the most groups whose block diagonal covers every True of ``connected`` (O, C)."""
    out_channels, channels = connected.shape
    for groups in range(math.gcd(out_channels, channels), 0, -1):
        if out_channels % groups or channels % groups:
            continue
        rows, cols = out_channels // groups, channels // groups
        outside = connected.clone()
        for group in range(groups):
            outside[group * rows : (group + 1) * rows, group * cols : (group + 1) * cols] = False
        if not outside.any():
            return groups
    return 1


def _block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Cut a dense (O, C, ...) weight to the grouped (O, C/g, ...) form of its diagonal blocks."""
    if groups == 1:
        return weight
    out_channels, channels = weight.shape[:2]
    rows, cols = out_channels // groups, channels // groups
    parts = [weight[g * rows : (g + 1) * rows, g * cols : (g + 1) * cols] for g in range(groups)]
    return torch.cat(parts, 0)


def _check_equal(name: str, block: SPDConv, fused: FusedSPDConv) -> None:
    """Compare both forms in float64 on two input sizes (one per parity of each axis)."""
    block64 = copy.deepcopy(block).double().eval()
    fused64 = copy.deepcopy(fused).double().eval()
    channels = block.conv.in_channels // block.spd.channel_factor
    generator = torch.Generator().manual_seed(0)
    for extra in range(max(block.spd.scale)):
        spatial = [
            (k + 2) * s + extra
            for k, s in zip(block.conv.kernel_size, block.spd.scale, strict=True)
        ]
        x = torch.randn(2, channels, *spatial, generator=generator, dtype=torch.float64)
        x = x.to(block.conv.weight.device)
        with torch.no_grad():
            expected = block64(x)
            actual = fused64(x)
        bound = _CHECK_RTOL * max(expected.abs().max().item(), 1.0)
        if expected.shape != actual.shape or (expected - actual).abs().max().item() > bound:
            raise RuntimeError(
                f"fused form of SPDConv {name!r} differs from the block on input shape "
                f"{tuple(x.shape)}; this is a bug in spd_rewrite.ops.fused"
            )


def _block_inputs(
    model: nn.Module,
    blocks: list[tuple[str, SPDConv]],
    example_inputs: torch.Tensor | Sequence[Any],
) -> dict[str, torch.Tensor]:
    """Run the model once and keep the first input of every block."""
    inputs = (example_inputs,) if torch.is_tensor(example_inputs) else tuple(example_inputs)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, block in blocks:

        def keep(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            seen.setdefault(name, args[0].detach())

        handles.append(block.register_forward_pre_hook(keep))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return seen


def _time_call(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Return the median seconds of ``module(x)`` after a warm-up call."""
    from torch.utils.benchmark import Timer

    was_training = module.training
    module.eval()
    timer = Timer("module(x)", globals={"module": module, "x": x})
    # Timer runs the statement in this thread, so the no_grad context applies to it.
    with torch.no_grad():
        module(x)
        seconds = timer.timeit(repeats).median
    module.train(was_training)
    return seconds


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
