"""The public pass: trace, match, replace, verify and report.

``rewrite`` returns the rewritten model and its report. In ``mode="graph"`` (the default) the model
is traced with torch.fx and the result is a ``GraphModule``. In ``mode="modules"`` conv and pool
submodules are swapped in place on a copy, which keeps the model's own class. The user's model is
never modified.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from spd_rewrite.errors import (
    InputShapeError,
    SpdRewriteError,
    UnsupportedNodeError,
    WeightTransferError,
)
from spd_rewrite.graph.build import (
    Built,
    Transfer,
    TransferKind,
    build_replacement,
)
from spd_rewrite.graph.channels import apply_channel_plan, propagate_conv_first
from spd_rewrite.graph.fx_ops import classify_node, describe_op
from spd_rewrite.graph.match import Candidate, Match, find_candidates, match_rules
from spd_rewrite.graph.replace import install_block, original_weights
from spd_rewrite.graph.shapes import propagate_shapes
from spd_rewrite.graph.trace import trace
from spd_rewrite.modules_mode import rewrite_submodules
from spd_rewrite.report.from_plan import count_params, layer_record, skip_record
from spd_rewrite.report.record import LayerRecord, LeafRecord, RewriteReport, SkipRecord, Totals
from spd_rewrite.rules.loader import load_rule_set
from spd_rewrite.rules.model import Action, Rule, RuleSet
from spd_rewrite.verify import run_model, verify

__all__ = ["RewriteResult", "as_inputs", "rewrite"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Rewritten:
    """Changes made by one of the two modes, before verification."""

    model: nn.Module
    layers: list[LayerRecord]
    skips: list[SkipRecord]
    leaves: list[LeafRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unused_rules: tuple[str, ...] = ()
    channel_edits: tuple[str, ...] = ()


@dataclass(frozen=True)
class RewriteResult:
    """The rewritten model and the report of what changed."""

    model: nn.Module
    report: RewriteReport


def rewrite(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[Any],
    rules: str | Path | RuleSet = "paper",
    *,
    transfer: str = "fresh",
    mode: str = "graph",
    leaf_modules: Sequence[str] = (),
    model_name: str | None = None,
) -> RewriteResult:
    """Rewrite every matched strided conv and pooling op of ``model`` into SPD form.

    Each match becomes a block in the op's place: ``SPDConv`` (space-to-depth, then a stride-1
    conv), ``SPDMaxPool`` (space-to-depth, then a stride-free max) or nothing (a removed pool).
    For example, with the ``paper`` rules ``layer2.0.conv1 = Conv2d(64, 128, 3, stride=2)``
    becomes ``layer2.0.conv1 = SPDConv(spd=SpaceToDepth(2), conv=Conv2d(256, 128, 3, padding=1))``.

    Args:
        model: the model to rewrite; it is copied, never modified.
        example_inputs: one tensor or a sequence of positional inputs, used to learn shapes and to
            verify the result.
        rules: a built-in rule set name, a path to a ``.toml`` rule file, or a ``RuleSet``.
        transfer: ``"fresh"`` (PyTorch's initialisation of the new convs) or ``"exact"`` (weights
            that reproduce the original function where the math allows).
        mode: ``"graph"`` (trace with torch.fx) or ``"modules"`` (swap submodules in place).
        leaf_modules: qualified names of submodules to keep whole when tracing.
        model_name: the name the report uses (default: the model's class name).

    Returns:
        The rewritten model (in the original's train/eval mode) and its report.

    Raises:
        SpdRewriteError: a subclass naming what failed; see :mod:`spd_rewrite.errors`.
    """
    inputs = as_inputs(example_inputs)
    rule_set = load_rule_set(rules)
    transfer_mode = _transfer(transfer)
    name = model_name or type(model).__name__
    if mode not in ("graph", "modules"):
        raise SpdRewriteError(f"invalid mode {mode!r}; use 'graph' or 'modules'")

    working = _copy(model)
    was_training = working.training
    working.eval()

    # Reference forward, counting FLOPs on the way.
    with FlopCounterMode(display=False) as counter:
        reference = run_model(working, inputs)
    flops_before = counter.get_total_flops()
    params_before = count_params(working)

    if mode == "modules":
        # Without a graph there is no channel propagation, so conv-first rules are skipped.
        result = rewrite_submodules(working, inputs, rule_set, transfer_mode, spd_first_only=True)
        changes = _Rewritten(
            model=working,
            layers=result.layers,
            skips=result.skips,
            warnings=unused_rule_warnings(rule_set, result.unused_rules),
            unused_rules=result.unused_rules,
        )
    else:
        changes = _rewrite_graph(working, inputs, rule_set, transfer_mode, leaf_modules)
    rewritten, layers, leaves = changes.model, changes.layers, changes.leaves

    shapes_may_change = any(layer.action == Action.REMOVE.value for layer in layers)
    exact = transfer_mode is Transfer.EXACT and all(
        layer.transfer in (TransferKind.EXACT.value, TransferKind.NONE.value) for layer in layers
    )
    with FlopCounterMode(display=False) as counter:
        verification = verify(
            rewritten,
            inputs,
            reference,
            shapes_may_change=shapes_may_change,
            exact=exact and not shapes_may_change,
            leaf_names=[leaf.name for leaf in leaves],
        )
    flops_after = counter.get_total_flops()

    rewritten.train(was_training)
    report = RewriteReport(
        model=name,
        rules=rule_set.name,
        mode=mode,
        transfer=transfer_mode.value,
        input_shapes=tuple(tuple(x.shape) for x in inputs if torch.is_tensor(x)),
        layers=tuple(layers),
        skips=tuple(changes.skips),
        leaves=tuple(leaves),
        totals=Totals(
            params_before=params_before,
            params_after=count_params(rewritten),
            flops_before=flops_before,
            flops_after=flops_after,
            downsampling_left=verification.downsampling_left,
            replaced=len(layers),
            leaves=len(leaves),
            max_abs_error=verification.max_abs_error if transfer_mode is Transfer.EXACT else None,
        ),
        output_shapes_before=verification.output_shapes_before,
        output_shapes_after=verification.output_shapes_after,
        left=verification.left,
        unused_rules=changes.unused_rules,
        warnings=tuple(changes.warnings),
        channel_edits=changes.channel_edits,
    )
    logger.info(
        "rewrote %s: %d replaced, %d downsampling left",
        name,
        len(layers),
        verification.downsampling_left,
    )
    return RewriteResult(rewritten, report)


def _rewrite_graph(
    model: nn.Module,
    inputs: tuple[Any, ...],
    rule_set: RuleSet,
    transfer: Transfer,
    leaf_modules: Sequence[str],
) -> _Rewritten:
    # Trace, keeping untraceable submodules whole.
    traced = trace(model, leaf_modules=leaf_modules)
    gm = traced.gm

    # Propagate shapes; keep the inputs and outputs of window ops for per-layer errors.
    keep: set[str] = set()
    leaf_nodes = {
        node.name: node
        for node in gm.graph.nodes
        if node.op == "call_module" and any(leaf.name == node.target for leaf in traced.leaves)
    }
    for node in leaf_nodes.values():
        keep.update(arg.name for arg in node.all_input_nodes)  # also nodes inside lists
    if transfer is Transfer.EXACT:
        for node in gm.graph.nodes:
            if classify_node(node, gm) is not None and node.args:
                keep.add(node.name)
                if isinstance(node.args[0], fx.Node):
                    keep.add(node.args[0].name)
    record = propagate_shapes(gm, inputs, keep)

    # Match the rules.
    candidates = find_candidates(gm, record.shapes)
    matched = match_rules(candidates, rule_set)
    warnings = unused_rule_warnings(rule_set, matched.unused_rules)

    # Build every block first: a module called twice must be read before it is replaced.
    nodes = {node.name: node for node in gm.graph.nodes}
    skips = [skip_record(skip.candidate, skip.reason) for skip in matched.skips]
    built: list[tuple[Match, Built]] = []
    for match in matched.matches:
        candidate = match.candidate
        node = nodes[candidate.node_name]
        try:
            block = build_replacement(
                candidate.op,
                match.rule,
                candidate.in_shape,
                original_weights(gm, node, candidate.op),
                transfer,
                rule_set.channel_order,
            )
        except UnsupportedNodeError as error:
            skips.append(skip_record(candidate, f"cannot be replaced: {error}"))
            continue
        except WeightTransferError as error:
            raise WeightTransferError(
                f"{_where(candidate)}: exact weight transfer failed: {error}"
            ) from error
        built.append((match, block))

    # Widen the consumers of conv-first blocks, or rebuild a block SPD-first where its rule allows.
    def rebuild(match: Match, rule: Rule) -> Built:
        candidate = match.candidate
        weights = original_weights(gm, nodes[candidate.node_name], candidate.op)
        return build_replacement(
            candidate.op, rule, candidate.in_shape, weights, transfer, rule_set.channel_order
        )

    channels = propagate_conv_first(gm, built, record.shapes, transfer, rebuild)
    built = list(channels.built)
    warnings += channels.warnings
    apply_channel_plan(gm, channels.plan, built)

    # Replace the matched nodes, then lint and recompile once.
    layers = []
    for match, block in built:
        candidate = match.candidate
        install_block(gm, nodes[candidate.node_name], block.module)
        layers.append(layer_record(match, block, record.values, transfer))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()

    # Rewrite inside the leaves at module level (SPD-first keeps their channel counts).
    leaves = []
    for leaf in traced.leaves:
        if not _has_submodule(gm, leaf.name):
            # The forward never calls it (a residual branch that is off, for example), so
            # delete_all_unused_submodules dropped it and there is nothing to rewrite or verify.
            continue
        leaf_module = gm.get_submodule(leaf.name)
        leaf_inputs = _leaf_inputs(leaf.name, leaf_nodes.values(), record.values)
        inner = rewrite_submodules(
            leaf_module, leaf_inputs, rule_set, transfer, prefix=leaf.name, spd_first_only=True
        )
        layers += inner.layers
        skips += inner.skips
        leaves.append(LeafRecord(leaf.name, leaf.module_type, leaf.reason))

    return _Rewritten(
        model=gm,
        layers=layers,
        skips=skips,
        leaves=leaves,
        warnings=warnings,
        unused_rules=matched.unused_rules,
        channel_edits=tuple(channels.plan.lines),
    )


def unused_rule_warnings(rule_set: RuleSet, unused: tuple[str, ...]) -> list[str]:
    """Warn about rules of a user's rule file that matched nothing (built-in sets stay quiet)."""
    if rule_set.source.startswith("builtin:"):
        return []
    warnings = [f"rule {name!r} of {rule_set.source} matched nothing" for name in unused]
    for warning in warnings:
        logger.warning(warning)
    return warnings


def _leaf_inputs(name: str, nodes, values: dict[str, Any]) -> tuple[Any, ...] | None:
    """Return the recorded positional inputs of the first call of leaf ``name``."""
    for node in nodes:
        if node.target != name or node.kwargs:
            continue
        if any(arg.name not in values for arg in node.all_input_nodes):
            return None
        # Arguments may nest nodes in lists (DenseNet's layers take a list of feature maps).
        return tuple(fx.node.map_arg(node.args, lambda arg: values[arg.name]))
    return None


def _where(candidate: Candidate) -> str:
    where = f"node {candidate.node_name!r} ({candidate.name}, {describe_op(candidate.op)})"
    if candidate.location:
        where += f" at {candidate.location}"
    return where


def _has_submodule(gm: nn.Module, name: str) -> bool:
    try:
        gm.get_submodule(name)
    except AttributeError:
        return False
    return True


def _copy(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise SpdRewriteError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model object"
        )
    try:
        return copy.deepcopy(model)
    except Exception as error:
        raise SpdRewriteError(
            f"cannot copy {type(model).__name__} ({type(error).__name__}: {error}); the pass works "
            "on a deep copy so that the original model stays untouched"
        ) from error


def as_inputs(example_inputs: torch.Tensor | Sequence[Any]) -> tuple[Any, ...]:
    """Return one tensor or a sequence of positional inputs as a tuple of inputs."""
    if torch.is_tensor(example_inputs):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)) and example_inputs:
        return tuple(example_inputs)
    raise InputShapeError(
        f"example_inputs must be a tensor or a non-empty sequence of inputs, got "
        f"{type(example_inputs).__name__}"
    )


def _transfer(value: str | Transfer) -> Transfer:
    try:
        return Transfer(value)
    except ValueError:
        raise SpdRewriteError(f"invalid transfer {value!r}; use 'fresh' or 'exact'") from None
