"""Rewrite conv and pool submodules in place, without tracing.

For models that a framework expects to keep their own class, and for the insides of submodules
that tracing kept whole (leaves). Only module calls are seen: functional calls such as
``F.max_pool2d`` inside a forward stay as they are and count as downsampling left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spd_rewrite.errors import UnsupportedNodeError, WeightTransferError
from spd_rewrite.graph.build import Built, OriginalWeights, Transfer, build_replacement
from spd_rewrite.graph.fx_ops import OpKind, classify_module
from spd_rewrite.graph.match import Candidate, Match, downsamples, is_global, match_rules
from spd_rewrite.ops.blocks import REPLACEMENT_TYPES
from spd_rewrite.report.from_plan import layer_record, skip_record
from spd_rewrite.report.record import LayerRecord, SkipRecord
from spd_rewrite.rules.model import Order, RuleSet

__all__ = ["ModuleRewrite", "rewrite_submodules"]

logger = logging.getLogger(__name__)


@dataclass
class ModuleRewrite:
    """Records of an in-place rewrite."""

    layers: list[LayerRecord] = field(default_factory=list)
    skips: list[SkipRecord] = field(default_factory=list)
    unused_rules: tuple[str, ...] = ()


def rewrite_submodules(
    root: nn.Module,
    inputs: tuple[Any, ...] | None,
    rule_set: RuleSet,
    transfer: Transfer,
    *,
    prefix: str = "",
    spd_first_only: bool = False,
) -> ModuleRewrite:
    """Swap the matched conv and pool submodules of ``root`` for replacement blocks, in place.

    Args:
        root: the module to edit (a copy the caller owns).
        inputs: example inputs of ``root``; without them pools (whose channels come from their
            input shape) are skipped and adaptive pools are never downsampling.
        rule_set: the rules to match.
        transfer: how the new convs are initialised.
        prefix: qualified name of ``root`` in the whole model, for the report.
        spd_first_only: refuse conv-first rules (they widen channels that an untraced module
            cannot carry).
    """
    values: dict[str, Any] = {}
    shapes = _record_shapes(root, inputs, values, keep=transfer is Transfer.EXACT)

    # Describe every conv and pool submodule, in definition order.
    candidates = []
    position = 0
    for name, module in _named_window_modules(root):
        op = classify_module(module)
        assert op is not None
        in_shape, out_shape = shapes.get(name, (None, None))
        global_pool = is_global(op, in_shape, out_shape)
        down = not global_pool and downsamples(op, in_shape, out_shape)
        full = f"{prefix}.{name}" if prefix else name
        candidates.append(
            Candidate(
                node_name=name,
                name=full,
                op=op,
                in_shape=in_shape,
                out_shape=out_shape,
                downsampling=down,
                is_global=global_pool,
                position=position if down else None,
                location="",
                input_node=f"{name}:input",
            )
        )
        position += int(down)

    matched = match_rules(candidates, rule_set)
    result = ModuleRewrite(unused_rules=matched.unused_rules)
    result.skips = [
        skip_record(skip.candidate, skip.reason)
        for skip in matched.skips
        if skip.candidate.downsampling
    ]

    # Build every block before swapping any: a module may appear twice.
    built: list[tuple[Match, Built]] = []
    for match in matched.matches:
        candidate = match.candidate
        if spd_first_only and match.rule.order is Order.CONV_FIRST:
            result.skips.append(
                skip_record(
                    candidate,
                    "conv-first would widen channels inside a submodule kept whole by tracing",
                )
            )
            continue
        module = root.get_submodule(candidate.node_name)
        original = OriginalWeights(getattr(module, "weight", None), getattr(module, "bias", None))
        try:
            block = build_replacement(
                candidate.op,
                match.rule,
                candidate.in_shape,
                original,
                transfer,
                rule_set.channel_order,
            )
        except UnsupportedNodeError as error:
            result.skips.append(skip_record(candidate, f"cannot be replaced: {error}"))
            continue
        except WeightTransferError as error:
            raise WeightTransferError(
                f"module {candidate.name!r}: exact weight transfer failed: {error}"
            ) from error
        built.append((match, block))

    for match, block in built:
        _set_submodule(root, match.candidate.node_name, block.module or nn.Identity())
        result.layers.append(layer_record(match, block, values, transfer))
    return result


def _named_window_modules(root: nn.Module):
    """Yield ``(name, module)`` for conv and pool submodules outside replacement blocks."""
    skipped: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(prefix) for prefix in skipped):
            continue
        if isinstance(module, REPLACEMENT_TYPES):
            skipped.append(name + ".")
            continue
        op = classify_module(module)
        if op is not None and op.kind is not OpKind.MEAN:
            yield name, module


def _record_shapes(
    root: nn.Module, inputs: tuple[Any, ...] | None, values: dict[str, Any], keep: bool
) -> dict[str, tuple[Any, Any]]:
    """Run ``inputs`` through ``root`` with hooks recording each window module's shapes."""
    shapes: dict[str, tuple[Any, Any]] = {}
    if inputs is None:
        return shapes

    def hook(name: str):
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if name in shapes or not args or not torch.is_tensor(args[0]):
                return
            out = output[0] if isinstance(output, tuple) else output
            shapes[name] = (tuple(args[0].shape), tuple(out.shape))
            if keep:
                values[f"{name}:input"] = args[0].detach()
                values[name] = out.detach()

        return record

    handles = [
        module.register_forward_hook(hook(name)) for name, module in _named_window_modules(root)
    ]
    try:
        with torch.no_grad():
            root(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, child = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
