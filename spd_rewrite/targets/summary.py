"""Size and cost of a bundled target, for the targets table."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from spd_rewrite.graph.fx_ops import OpKind, classify_module
from spd_rewrite.ops.blocks import REPLACEMENT_TYPES
from spd_rewrite.targets.registry import build_target, get_target

__all__ = ["TargetSummary", "downsampling_modules", "summarize"]


@dataclass(frozen=True)
class TargetSummary:
    """Parameters, GFLOPs at the natural input size, and downsampling ops left."""

    name: str
    input_size: int
    params: int
    gflops: float
    downsampling_left: int


def summarize(name: str) -> TargetSummary:
    """Build target ``name`` and measure it.

    GFLOPs count 2 FLOPs per multiply-add of convs and matrix products
    (``torch.utils.flop_counter``), at batch 1 and the natural input size, on the meta device.
    """
    info = get_target(name)
    model = build_target(name).eval()
    params = sum(p.numel() for p in model.parameters())
    left = downsampling_modules(model)

    meta_model = model.to("meta")
    example = torch.empty(1, 3, info.input_size, info.input_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_model(example)
    return TargetSummary(name, info.input_size, params, counter.get_total_flops() / 1e9, left)


def downsampling_modules(model: torch.nn.Module) -> int:
    """Count strided conv and pool modules outside replacement blocks."""
    count = 0
    inside_blocks: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside_blocks):
            continue
        if isinstance(module, REPLACEMENT_TYPES):
            inside_blocks.append(name + ".")
            continue
        op = classify_module(module)
        if op is not None and op.kind in (OpKind.CONV, OpKind.MAX_POOL, OpKind.AVG_POOL):
            count += int(op.is_strided)
    return count
