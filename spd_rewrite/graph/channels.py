"""Carry the wider output of conv-first blocks to the layers that read it.

A conv-first block (a stride-1 conv, then space-to-depth) returns ``factor`` times the channels of
the conv it replaces. Every layer that reads those channels must change with them:

* per-channel layers (batch norm, instance norm, PReLU) get their parameters and statistics
  replicated to every phase, and pass the wider tensor on;
* channel-wise ops (activations, dropout, pooling, upsampling, element-wise arithmetic with a
  scalar or a tensor widened the same way) pass it on unchanged;
* ``torch.cat`` along the channels joins the layouts of its inputs;
* convs and linear layers absorb the change: with exact transfer their new input weights read
  phase 0 only, so the rewritten model computes the original function.

Propagation stops with a reason at anything else: an op it does not know, a residual add with an
unwidened tensor, a reshape to a fixed size, indexing or splitting, a submodule kept whole by
tracing, or the model's output. The rule's ``fallback`` then decides between raising
:class:`~spd_rewrite.errors.ChannelPropagationError` and rebuilding the block SPD-first.

The channel dependency graph is a ``networkx.DiGraph`` over node names. An edge ``u -> v`` means
that ``v`` reads ``u``'s output, and no edge leaves a node that absorbs the channels. The nodes
reachable from a producer are therefore those that share its channel dimension.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from torch import fx, nn

from spd_rewrite.errors import ChannelPropagationError, UnsupportedNodeError
from spd_rewrite.graph.build import Built, Transfer, TransferKind
from spd_rewrite.graph.channel_edits import (
    Segment,
    layer_channels,
)
from spd_rewrite.graph.channel_walk import ChannelStop, PropagationStopped, Walk, Wide, channels_of
from spd_rewrite.graph.match import Match, layer_name
from spd_rewrite.ops.blocks import ConvSPD
from spd_rewrite.rules.model import Fallback, Order, Rule

__all__ = [
    "ChannelPlan",
    "ChannelStop",
    "ConvFirstResult",
    "apply_channel_plan",
    "channel_graph",
    "propagate_conv_first",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelPlan:
    """The edits that carry every conv-first block's channels to their consumers."""

    module_edits: Mapping[str, nn.Module] = field(default_factory=dict)  # qualified name -> layer
    block_edits: Mapping[str, nn.Module] = field(default_factory=dict)  # node name -> block conv
    lines: tuple[str, ...] = ()  # one "producer.out -> ... -> consumer.in" line per coupling
    approximate: frozenset[str] = frozenset()  # producers whose chain no longer computes exactly


@dataclass(frozen=True)
class ConvFirstResult:
    """The built blocks after fallbacks, the channel edits, and a warning per fallback."""

    built: tuple[tuple[Match, Built], ...]
    plan: ChannelPlan
    warnings: tuple[str, ...]


def propagate_conv_first(
    gm: fx.GraphModule,
    built: Sequence[tuple[Match, Built]],
    shapes: Mapping[str, Any],
    transfer: Transfer,
    rebuild: Callable[[Match, Rule], Built],
) -> ConvFirstResult:
    """Plan the channel edits for every conv-first block, falling back to SPD-first where allowed.

    Args:
        gm: the traced graph module, before any block is installed.
        built: the matched nodes and their built blocks.
        shapes: the output shape of every node on the example input.
        transfer: exact transfer puts consumer weights at phase 0, fresh re-initialises them.
        rebuild: builds a match's block under another rule (the SPD-first fallback).

    Raises:
        ChannelPropagationError: a block's wider channels cannot reach every consumer and its rule
            has ``fallback = "refuse"``. The message names the node where propagation stopped.
    """
    blocks = list(built)
    warnings: list[str] = []
    while True:
        by_node = {match.candidate.node_name: (match, block) for match, block in blocks}
        try:
            plan = _plan_channels(
                gm, {name: b for name, (_, b) in by_node.items()}, shapes, transfer
            )
        except PropagationStopped as stopped:
            stop = stopped.stop
            involved = [by_node[name] for name in sorted(stop.producers)]
            for match, _ in involved:
                if match.rule.fallback is Fallback.REFUSE:
                    raise ChannelPropagationError(_stop_message(stop, match)) from None
            fallen = {}
            for match, _ in involved:
                rule = dataclasses.replace(match.rule, order=Order.SPD_FIRST)
                try:
                    fallen[match.candidate.node_name] = rebuild(match, rule)
                except UnsupportedNodeError as error:
                    raise ChannelPropagationError(
                        f"{_stop_message(stop, match)}; its SPD-first fallback failed too: {error}"
                    ) from error
                warning = (
                    f"{match.candidate.name}: rule {match.rule.name!r} fell back to SPD-first, "
                    f"because the wider channels of conv-first stop at node {stop.node!r}: "
                    f"{stop.reason}"
                )
                logger.warning(warning)
                warnings.append(warning)
            blocks = [(m, fallen.get(m.candidate.node_name, b)) for m, b in blocks]
            continue

        if plan.approximate:
            blocks = [
                (m, dataclasses.replace(b, transfer=TransferKind.APPROXIMATE))
                if m.candidate.node_name in plan.approximate and b.transfer is TransferKind.EXACT
                else (m, b)
                for m, b in blocks
            ]
        return ConvFirstResult(tuple(blocks), plan, tuple(warnings))


def apply_channel_plan(
    gm: fx.GraphModule, plan: ChannelPlan, built: Sequence[tuple[Match, Built]]
) -> None:
    """Swap the widened layers into ``gm`` and into the conv-first blocks that read them."""
    for target, module in plan.module_edits.items():
        parent_name, _, child = target.rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, child, module)
    blocks = {match.candidate.node_name: block for match, block in built}
    for node_name, conv in plan.block_edits.items():
        block = blocks[node_name].module
        assert isinstance(block, ConvSPD)
        block.conv = conv


def channel_graph(gm: fx.GraphModule, blocks: Mapping[str, Built]) -> nx.DiGraph:
    """Build the channel dependency graph of ``gm``: ``u -> v`` where ``v`` reads ``u``'s channels.

    Nodes that absorb a channel change (convs, linear layers and the blocks replacing matched
    ops) get no outgoing edges, except conv-first blocks, whose outputs start a new change.
    """
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node.name)
        block = blocks.get(node.name)
        starts_change = block is not None and block.channel_factor > 1
        if _absorbs(node, gm, blocks) and not starts_change:
            continue
        for user in node.users:
            graph.add_edge(node.name, user.name)
    return graph


def _absorbs(node: fx.Node, gm: fx.GraphModule, blocks: Mapping[str, Built]) -> bool:
    if node.name in blocks:
        return blocks[node.name].module is not None
    if node.op != "call_module":
        return False
    entry = layer_channels(gm.get_submodule(str(node.target)))
    return entry is not None and not entry.per_channel


def _plan_channels(
    gm: fx.GraphModule,
    blocks: Mapping[str, Built],
    shapes: Mapping[str, Any],
    transfer: Transfer,
) -> ChannelPlan:
    """Propagate the channel change of every conv-first block in ``blocks`` (by node name).

    Raises:
        PropagationStopped: propagation cannot continue; the stop names the node and the producers.
    """
    producers = {name: block for name, block in blocks.items() if block.channel_factor > 1}
    if not producers:
        return ChannelPlan()
    graph = channel_graph(gm, blocks)
    region: set[str] = set()
    for name in producers:
        region |= nx.descendants(graph, name)

    walk = Walk(gm, blocks, shapes, exact=transfer is Transfer.EXACT)
    for node in gm.graph.nodes:
        block = producers.get(node.name)
        if node.name in region:
            walk.visit(node)
        if block is not None:
            assert isinstance(block.module, ConvSPD)
            order = block.module.spd.order
            channels = channels_of(shapes, node.name)  # the recorded shape is the original one
            walk.state[node.name] = Wide(
                (Segment(channels, block.channel_factor, order),),
                frozenset({node.name}),
                (f"{layer_name(node)}.out",),
            )
    walk.check_shared_modules()
    return ChannelPlan(
        module_edits={target: edit.module for target, edit in walk.module_edits.items()},
        block_edits=walk.block_edits,
        lines=tuple(dict.fromkeys(walk.lines)),
        approximate=frozenset(walk.approximate),
    )


def _stop_message(stop: ChannelStop, match: Match) -> str:
    rule = match.rule
    where = f"{stop.op}, {stop.name}" if stop.name != stop.node else stop.op
    return (
        f"cannot widen the consumers of conv-first block {match.candidate.name!r}: propagation "
        f"stops at node {stop.node!r} ({where}) because {stop.reason}; set "
        f'fallback = "spd-first" in rule {rule.name!r} ({rule.source or "rule set"}) to build '
        f"this block SPD-first instead, or exclude {match.candidate.name!r} from that rule"
    )
