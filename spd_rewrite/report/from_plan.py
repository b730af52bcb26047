"""Turn matches and built replacement blocks into report records."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spd_rewrite.graph.build import Built, Transfer, conv_flops
from spd_rewrite.graph.fx_ops import OpKind, WindowOp, describe_op
from spd_rewrite.graph.match import Candidate, Match
from spd_rewrite.ops.blocks import ConvSPD
from spd_rewrite.ops.space_to_depth import SpaceToDepth
from spd_rewrite.report.record import LayerRecord, SkipRecord
from spd_rewrite.verify import max_abs_difference

__all__ = ["count_params", "layer_record", "skip_record"]


def layer_record(
    match: Match, block: Built, values: dict[str, Any], transfer: Transfer
) -> LayerRecord:
    candidate = match.candidate
    op = candidate.op
    params_before = _op_params(op)
    params_after = count_params(block.module) if block.module is not None else 0
    flops_before = 0
    if op.kind is OpKind.CONV and op.in_channels is not None:
        flops_before = conv_flops(candidate.out_shape, op.in_channels, op.groups, op.kernel)
    flops_after = 0
    conv = getattr(block.module, "conv", None)
    if isinstance(conv, nn.modules.conv._ConvNd):
        conv_out = (
            _stride1_output_shape(candidate, conv)
            if isinstance(block.module, ConvSPD)
            else candidate.out_shape
        )
        flops_after = conv_flops(conv_out, conv.in_channels, conv.groups, tuple(conv.kernel_size))

    error = None
    if transfer is Transfer.EXACT and block.module is not None and candidate.node_name in values:
        error = _local_error(candidate, block, values)

    return LayerRecord(
        name=candidate.name,
        op=describe_op(op),
        action=match.rule.action.value,
        replacement=block.description,
        rule=match.rule.name,
        in_shape=candidate.in_shape,
        # A removed op passes its input through.
        out_shape=candidate.out_shape if block.module is not None else candidate.in_shape,
        params_before=params_before,
        params_after=params_after,
        flops_before=flops_before,
        flops_after=flops_after,
        transfer=block.transfer.value,
        max_abs_error=error,
        location=candidate.location,
    )


def _local_error(candidate: Candidate, block: Built, values: dict[str, Any]) -> float | None:
    """Run the block on the op's recorded input and compare with the op's recorded output."""
    source = values.get(candidate.input_node or "")
    expected = values.get(candidate.node_name)
    if not torch.is_tensor(source) or expected is None:
        return None
    assert block.module is not None
    with torch.no_grad():
        actual = block.module.eval()(source)
    if isinstance(block.module, ConvSPD) and torch.is_tensor(expected):
        actual = _phase_zero(actual, block.module.spd, expected.shape[1])
    return max_abs_difference(expected, actual)


def _phase_zero(widened: torch.Tensor, spd: SpaceToDepth, channels: int) -> torch.Tensor:
    """Return the channels of SPD phase 0, which hold the strided op's output (conv-first)."""
    if spd.order == "unshuffle":
        # channel = c * S + phase
        return widened[:, :: spd.channel_factor][:, :channels]
    # channel = phase * C + c
    return widened[:, :channels]


def _stride1_output_shape(candidate: Candidate, conv: nn.modules.conv._ConvNd):
    """Return the output shape of the stride-1 conv of a conv-first block."""
    if candidate.in_shape is None:
        return None
    spatial = [
        size + 2 * pad - dilation * (kernel - 1)
        for size, pad, dilation, kernel in zip(
            candidate.in_shape[2:], conv.padding, conv.dilation, conv.kernel_size, strict=True
        )
    ]
    return (candidate.in_shape[0], conv.out_channels, *spatial)


def skip_record(candidate: Candidate, reason: str) -> SkipRecord:
    return SkipRecord(
        name=candidate.name,
        op=describe_op(candidate.op),
        reason=reason,
        downsampling=candidate.downsampling,
        location=candidate.location,
    )


def _op_params(op: WindowOp) -> int:
    if op.kind is not OpKind.CONV or op.in_channels is None or op.out_channels is None:
        return 0
    weight = op.out_channels * (op.in_channels // op.groups)
    for size in op.kernel:
        weight *= size
    return weight + (op.out_channels if op.has_bias else 0)


def count_params(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters())
