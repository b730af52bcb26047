"""Find the window ops of a traced graph and match them against a rule set.

Every conv and pooling node becomes a :class:`Candidate`. A candidate that downsamples (stride > 1,
or an adaptive pool that shrinks its input) is a *downsampling step*; global pooling (adaptive
pooling to 1, a mean over every spatial axis, a pool whose window covers the whole map) never is.
The first rule that fits a downsampling step decides its fate; every step that stays is a
:class:`Skip` with the reason.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import fx

from spd_rewrite.graph.fx_ops import OpKind, WindowOp, classify_node
from spd_rewrite.graph.trace import MODULE_PATH_KEY
from spd_rewrite.rules.model import Action, Rule, RuleSet

__all__ = [
    "Candidate",
    "Match",
    "MatchResult",
    "Skip",
    "downsamples",
    "find_candidates",
    "is_global",
    "match_rules",
]

logger = logging.getLogger(__name__)

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


@dataclass(frozen=True)
class Candidate:
    """A conv or pooling node with its shapes and role."""

    node_name: str
    name: str  # the module's qualified name, or "<module path>.<node name>" for a function call
    op: WindowOp
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None
    downsampling: bool
    is_global: bool
    position: int | None  # index among the downsampling steps, in graph order
    location: str  # "file.py:line" of the call, where fx recorded it
    input_node: str | None = None  # name of the node that feeds the op


@dataclass(frozen=True)
class Match:
    """A downsampling step and the rule that matched it."""

    candidate: Candidate
    rule: Rule


@dataclass(frozen=True)
class Skip:
    """A node the pass leaves alone, and why."""

    candidate: Candidate
    reason: str


@dataclass(frozen=True)
class MatchResult:
    """Matches, skips (downsampling steps and look-alikes) and the rules that matched nothing."""

    candidates: tuple[Candidate, ...]
    matches: tuple[Match, ...]
    skips: tuple[Skip, ...]
    unused_rules: tuple[str, ...]


def node_location(node: fx.Node) -> str:
    """Return ``file:line`` of the user code that created ``node``, or an empty string."""
    trace = node.stack_trace or ""
    frames = [frame for frame in _FRAME.findall(trace) if not _is_library_frame(frame[0])]
    if not frames:
        return ""
    path, line, _ = frames[-1]
    return f"{path}:{line}"


def _is_library_frame(path: str) -> bool:
    """Frames inside torch or spd_rewrite are tracing machinery, not the user's call site."""
    normalized = path.replace("\\", "/")
    return "/torch/" in normalized or "/spd_rewrite/" in normalized


def layer_name(node: fx.Node) -> str:
    """Return the name a user knows a node by: module target, or module path plus node name."""
    if node.op == "call_module":
        return str(node.target)
    path = node.meta.get(MODULE_PATH_KEY, "")
    return f"{path}.{node.name}" if path else node.name


def find_candidates(gm: fx.GraphModule, shapes: dict[str, object]) -> list[Candidate]:
    """Describe every conv and pooling node of ``gm``; ``shapes`` maps node names to shapes."""
    candidates = []
    position = 0
    for node in gm.graph.nodes:
        op = classify_node(node, gm)
        if op is None:
            continue
        in_shape = _shape_of(node.args[0] if node.args else None, shapes)
        out_shape = _shape_of(node, shapes)
        global_pool = is_global(op, in_shape, out_shape)
        if op.kind is OpKind.MEAN and not global_pool:
            continue  # a mean over channels or part of the map is not pooling
        downsampling = not global_pool and downsamples(op, in_shape, out_shape)
        source = node.args[0] if node.args else None
        candidates.append(
            Candidate(
                node_name=node.name,
                name=layer_name(node),
                op=op,
                in_shape=in_shape,
                out_shape=out_shape,
                downsampling=downsampling,
                is_global=global_pool,
                position=position if downsampling else None,
                location=node_location(node),
                input_node=source.name if isinstance(source, fx.Node) else None,
            )
        )
        position += int(downsampling)
    return candidates


def match_rules(candidates: list[Candidate], rule_set: RuleSet) -> MatchResult:
    """Pair each downsampling step with the first rule that fits it."""
    matches: list[Match] = []
    skips: list[Skip] = []
    used: set[str] = set()
    for candidate in candidates:
        if not candidate.downsampling:
            skips.append(Skip(candidate, _why_not_downsampling(candidate)))
            continue
        adaptive = candidate.op.kind in (OpKind.ADAPTIVE_AVG_POOL, OpKind.ADAPTIVE_MAX_POOL)
        # Rules cannot name adaptive pools, which have no stride for them to test.
        rule = None
        if not adaptive:
            rule = rule_set.first_match(candidate.op, candidate.name, candidate.position)
        if rule is not None:
            used.add(rule.name)
        if candidate.op.unsupported:
            skips.append(Skip(candidate, f"cannot be replaced: {candidate.op.unsupported}"))
        elif adaptive:
            skips.append(
                Skip(
                    candidate,
                    "adaptive pooling to a fixed size has no fixed stride; resize the input or "
                    "replace it in the model code",
                )
            )
        elif rule is None:
            skips.append(Skip(candidate, f"no rule of set {rule_set.name!r} matches it"))
        elif rule.action is Action.KEEP:
            skips.append(Skip(candidate, f"rule {rule.name!r} keeps it"))
        else:
            matches.append(Match(candidate, rule))
            logger.debug("%s matches rule %s", candidate.name, rule.name)

    unused = tuple(rule.name for rule in rule_set.rules if rule.name not in used)
    return MatchResult(tuple(candidates), tuple(matches), tuple(skips), unused)


def _shape_of(value: object, shapes: dict[str, object]) -> tuple[int, ...] | None:
    if not isinstance(value, fx.Node):
        return None
    shape = shapes.get(value.name)
    if isinstance(shape, tuple) and all(isinstance(v, int) for v in shape):
        return shape
    if isinstance(shape, (tuple, list)) and shape and isinstance(shape[0], tuple):
        return shape[0]  # max pool with indices, for example: the values come first
    return None


def _spatial(shape: tuple[int, ...] | None, dims: int) -> tuple[int, ...] | None:
    if shape is None or len(shape) < dims + 1:
        return None
    return shape[-dims:] if dims else None


def is_global(op: WindowOp, in_shape, out_shape) -> bool:
    if op.kind is OpKind.MEAN:
        if in_shape is None or len(in_shape) < 3:
            return False
        rank = len(in_shape)
        dims = {d % rank for d in op.mean_dims}
        return set(range(2, rank)) <= dims
    if op.kind in (OpKind.ADAPTIVE_AVG_POOL, OpKind.ADAPTIVE_MAX_POOL):
        return all(size == 1 for size in (op.output_size or ()))
    if op.kind is OpKind.CONV:
        return False
    spatial_in = _spatial(in_shape, op.dims)
    spatial_out = _spatial(out_shape, op.dims)
    if spatial_in is None or spatial_out is None or not op.kernel:
        return False
    covers = all(
        k >= size + 2 * p for k, size, p in zip(op.kernel, spatial_in, op.padding, strict=True)
    )
    return covers and all(size == 1 for size in spatial_out)


def downsamples(op: WindowOp, in_shape, out_shape) -> bool:
    if op.kind in (OpKind.ADAPTIVE_AVG_POOL, OpKind.ADAPTIVE_MAX_POOL):
        spatial_in = _spatial(in_shape, op.dims)
        spatial_out = _spatial(out_shape, op.dims)
        if spatial_in is None or spatial_out is None:
            return False
        return any(o < i for o, i in zip(spatial_out, spatial_in, strict=True))
    if op.kind in (OpKind.MEAN, OpKind.RESIZE):
        return False
    return op.is_strided


def _why_not_downsampling(candidate: Candidate) -> str:
    op = candidate.op
    if op.kind is OpKind.RESIZE:
        return "a transposed conv or resize, not a strided conv or pool: never a match"
    if candidate.is_global:
        return "global pooling is never a match"
    if op.kind in (OpKind.ADAPTIVE_AVG_POOL, OpKind.ADAPTIVE_MAX_POOL):
        return "adaptive pooling that keeps the map size at this input is not downsampling"
    return "stride 1: not a downsampling step"
