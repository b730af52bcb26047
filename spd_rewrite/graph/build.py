"""Build the replacement block for one matched op: layout, modules and transferred weights.

No graph editing here; :mod:`spd_rewrite.graph.replace` puts the block into the graph and
:mod:`spd_rewrite.modules_mode` puts it into a module tree.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import nn

from spd_rewrite.errors import UnsupportedNodeError, WeightTransferError
from spd_rewrite.graph.fx_ops import OpKind, WindowOp, describe_op
from spd_rewrite.ops.avg_pool_divisor import AvgPoolDivisorCorrection
from spd_rewrite.ops.blocks import ConvSPD, SPDConv, SPDMaxPool
from spd_rewrite.ops.geometry import AxisLayout, WindowAxis, plan_axis
from spd_rewrite.ops.phase_max import PhaseMax
from spd_rewrite.ops.space_to_depth import SpaceToDepth
from spd_rewrite.rules.model import Action, Order, Rule
from spd_rewrite.transfer.exact import (
    avg_pool_divisor_is_constant,
    avg_pool_weight_divisor,
    spd_avg_pool_weight,
    spd_conv_weight,
    spd_max_pool_init_weight,
)

__all__ = ["Built", "Transfer", "TransferKind", "build_replacement", "conv_flops"]

logger = logging.getLogger(__name__)

_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Transfer(StrEnum):
    """Initialisation of replacement weights."""

    FRESH = "fresh"  # PyTorch's default initialisation of the new layers
    EXACT = "exact"  # weights that compute the original function where the math allows


class TransferKind(StrEnum):
    """Fidelity of a replacement before any training, as reported per layer."""

    FRESH = "fresh"
    EXACT = "exact"
    APPROXIMATE = "approximate"
    NONE = "none"  # removed op


@dataclass(frozen=True)
class OriginalWeights:
    """The tensors of a matched conv (module or functional form)."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass
class Built:
    """A built replacement block and its bookkeeping for the report."""

    module: nn.Module | None  # None: the op is removed
    description: str
    transfer: TransferKind
    channel_factor: int  # output channels are multiplied by this (conv-first), else 1
    layouts: tuple[AxisLayout, ...]


def plan_layouts(
    op: WindowOp, rule: Rule, order_conv_first: bool = False
) -> tuple[AxisLayout, ...]:
    """Plan the per-axis SPD layout of ``op`` for ``rule``'s kernel choice."""
    sizes = rule.kernel.per_axis(op)
    layouts = []
    for axis in range(op.dims):
        window = WindowAxis(
            kernel=op.kernel[axis],
            stride=op.stride[axis],
            padding=op.padding[axis],
            dilation=op.dilation[axis] if op.dilation else 1,
            ceil_mode=op.ceil_mode,
        )
        try:
            layouts.append(plan_axis(window, sizes[axis]))
        except ValueError as error:
            raise UnsupportedNodeError(str(error)) from None
    return tuple(layouts)


def build_replacement(
    op: WindowOp,
    rule: Rule,
    in_shape: tuple[int, ...] | None,
    original: OriginalWeights,
    transfer: Transfer,
    channel_order: str,
) -> Built:
    """Build the block that replaces ``op`` under ``rule``.

    Raises:
        UnsupportedNodeError: the op has a form the replacement cannot reproduce.
        WeightTransferError: exact transfer is asked for but the layout cannot hold the weights.
    """
    if rule.action is Action.REMOVE:
        return Built(None, "removed", TransferKind.NONE, 1, ())
    if rule.order is Order.CONV_FIRST:
        return _build_conv_first(op, rule, original, transfer, channel_order)

    if op.kind is OpKind.CONV and op.groups > 1 and channel_order == "reference":
        raise UnsupportedNodeError(
            f"a conv with groups={op.groups} cannot keep its groups after SPD in the "
            "'reference' channel order; use channel_order = \"unshuffle\""
        )
    if op.kind is not OpKind.CONV and (in_shape is None or len(in_shape) < 2):
        raise UnsupportedNodeError("its input shape is unknown, so its channels are unknown")

    layouts = plan_layouts(op, rule)
    scale = tuple(layout.scale for layout in layouts)
    factor = math.prod(scale)
    kernel = tuple(layout.kernel for layout in layouts)
    padding = tuple(layout.padding for layout in layouts)
    device, dtype = _placement(original, op)

    if rule.action is Action.SPD_MAX:
        channels = in_shape[1]  # type: ignore[index]
        spd = _spd(layouts, op.dims, channel_order, pad_value=float("-inf"))
        pool = PhaseMax(layouts, channels, order=channel_order)  # type: ignore[arg-type]
        description = f"SPD({_fmt(scale)}) -> PhaseMax(k{_fmt(kernel)})"
        return Built(SPDMaxPool(spd, pool), description, TransferKind.EXACT, 1, layouts)

    if op.kind is OpKind.CONV:
        in_channels, out_channels, groups = op.in_channels, op.out_channels, op.groups
        has_bias = op.has_bias
    else:
        in_channels = out_channels = in_shape[1]  # type: ignore[index]
        groups, has_bias = 1, True
    assert in_channels is not None and out_channels is not None

    # Exact transfer overwrites every weight, so skip PyTorch's random initialisation there.
    exact = transfer is Transfer.EXACT
    conv = _CONV_CLASSES[op.dims](
        in_channels * factor,
        out_channels,
        kernel_size=kernel,
        stride=1,
        padding=padding,
        groups=groups,
        bias=has_bias,
        device="meta" if exact else device,
        dtype=dtype,
    )
    if exact:
        conv = conv.to_empty(device=device)
    spd = _spd(layouts, op.dims, channel_order)
    correction = None
    kind = TransferKind.FRESH
    if transfer is Transfer.EXACT:
        kind, correction = _transfer(op, conv, layouts, original, channel_order, in_channels)

    description = (
        f"SPD({_fmt(scale)}) -> Conv{op.dims}d({in_channels * factor}->{out_channels}, "
        f"k{_fmt(kernel)}, s1{', p' + _fmt(padding) if any(padding) else ''}"
        f"{', g' + str(groups) if groups > 1 else ''})"
    )
    if correction is not None:
        description += " -> divisor correction"
    return Built(SPDConv(spd, conv, correction), description, kind, 1, layouts)


def _build_conv_first(
    op: WindowOp, rule: Rule, original: OriginalWeights, transfer: Transfer, channel_order: str
) -> Built:
    """Build the conv at stride 1 followed by SPD: a block with ``prod(stride)`` times the channels.

    Stride-1 output ``s*i`` reads the same inputs as strided output ``i``, so phase 0 of an SPD
    layer with no ``pad_before`` and blocks rounded up contains the strided output for every input
    size. Exact transfer therefore copies the original weights unchanged; the consumers downstream
    must read phase 0 (:mod:`spd_rewrite.graph.channels` widens them).
    """
    if op.kind is not OpKind.CONV or op.in_channels is None or op.out_channels is None:
        raise UnsupportedNodeError(f"order 'conv-first' applies to convs only, not {op.op_name}")
    if rule.kernel.mode != "same":
        raise UnsupportedNodeError(
            f"order 'conv-first' keeps the conv's kernel, but rule {rule.name!r} sets "
            f'kernel = {rule.kernel}; set kernel = "same" in that rule'
        )

    device, dtype = _placement(original, op)
    conv = _CONV_CLASSES[op.dims](
        op.in_channels,
        op.out_channels,
        kernel_size=op.kernel,
        stride=1,
        padding=op.padding,
        dilation=op.dilation,
        groups=op.groups,
        bias=op.has_bias,
        device=device,
        dtype=dtype,
    )
    spd = SpaceToDepth(scale=op.stride, dims=op.dims, order=channel_order)  # type: ignore[arg-type]
    kind = TransferKind.FRESH
    if transfer is Transfer.EXACT:
        if original.weight is None:
            raise WeightTransferError("the original conv weight is not available")
        with torch.no_grad():
            conv.weight.copy_(original.weight.detach())
            if conv.bias is not None and original.bias is not None:
                conv.bias.copy_(original.bias.detach())
        kind = TransferKind.EXACT

    factor = math.prod(op.stride)
    description = (
        f"Conv{op.dims}d({op.in_channels}->{op.out_channels}, k{_fmt(op.kernel)}, s1"
        f"{', p' + _fmt(op.padding) if any(op.padding) else ''}"
        f"{', g' + str(op.groups) if op.groups > 1 else ''}) -> SPD({_fmt(op.stride)}), "
        f"{op.out_channels * factor} channels out"
    )
    return Built(ConvSPD(conv, spd), description, kind, factor, ())


def _spd(
    layouts: tuple[AxisLayout, ...], dims: int, order: str, pad_value: float = 0.0
) -> SpaceToDepth:
    return SpaceToDepth(
        scale=tuple(layout.scale for layout in layouts),
        dims=dims,
        pad_before=tuple(layout.pad_before for layout in layouts),
        block_offset=tuple(layout.block_offset for layout in layouts),
        pad_value=pad_value,
        order=order,  # type: ignore[arg-type]
    )


def _transfer(
    op: WindowOp,
    conv: nn.Module,
    layouts: tuple[AxisLayout, ...],
    original: OriginalWeights,
    order: str,
    channels: int,
) -> tuple[TransferKind, AvgPoolDivisorCorrection | None]:
    """Fill ``conv`` with weights that reproduce ``op``; return how exact they are."""
    weight: torch.Tensor
    correction = None
    kind = TransferKind.EXACT
    if op.kind is OpKind.CONV:
        if original.weight is None:
            raise WeightTransferError("the original conv weight is not available")
        weight = spd_conv_weight(original.weight.detach(), layouts, op.groups, order)  # type: ignore[arg-type]
    elif op.kind is OpKind.AVG_POOL:
        divisor = avg_pool_weight_divisor(op.kernel, op.divisor_override)
        weight = spd_avg_pool_weight(channels, op.kernel, layouts, divisor, order)  # type: ignore[arg-type]
        axes = [
            WindowAxis(k, s, p, 1, op.ceil_mode)
            for k, s, p in zip(op.kernel, op.stride, op.padding, strict=True)
        ]
        if not avg_pool_divisor_is_constant(axes, op.count_include_pad, op.divisor_override):
            correction = AvgPoolDivisorCorrection(
                kernel=op.kernel,
                stride=op.stride,
                padding=op.padding,
                count_include_pad=op.count_include_pad,
                weight_divisor=divisor,
            )
    else:
        weight = spd_max_pool_init_weight(channels, layouts, order)  # type: ignore[arg-type]
        kind = TransferKind.APPROXIMATE

    with torch.no_grad():
        conv.weight.copy_(weight.to(conv.weight.dtype))  # type: ignore[union-attr]
        if conv.bias is not None:  # type: ignore[union-attr]
            if op.kind is OpKind.CONV and original.bias is not None:
                conv.bias.copy_(original.bias.detach())  # type: ignore[union-attr]
            else:
                conv.bias.zero_()  # type: ignore[union-attr]
    return kind, correction


def _placement(original: OriginalWeights, op: WindowOp) -> tuple[torch.device, torch.dtype]:
    if original.weight is not None:
        dtype = original.weight.dtype if original.weight.is_floating_point() else torch.float32
        return original.weight.device, dtype
    return torch.device("cpu"), torch.float32


def _fmt(values: tuple[int, ...]) -> str:
    if values and all(v == values[0] for v in values):
        return str(values[0])
    return "x".join(map(str, values))


def conv_flops(
    out_shape: tuple[int, ...] | None, in_channels: int, groups: int, kernel: tuple[int, ...]
) -> int:
    """FLOPs of a conv, counted as 2 per multiply-add like ``torch.utils.flop_counter``."""
    if out_shape is None:
        return 0
    return 2 * math.prod(out_shape) * (in_channels // groups) * math.prod(kernel)


def describe_original(op: WindowOp) -> str:
    """Return the report's "before" text for ``op``."""
    return describe_op(op)
