"""Rule and rule-set records: what a rule matches and what it does with a match.

Rules are frozen dataclasses, built and validated once by :mod:`spd_rewrite.rules.loader`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from enum import StrEnum

from spd_rewrite.graph.fx_ops import OpKind, WindowOp

__all__ = [
    "Action",
    "Fallback",
    "GroupsFilter",
    "KernelChoice",
    "Order",
    "Rule",
    "RuleSet",
]

# Kinds a rule may name in `op`.
MATCHABLE_KINDS = (OpKind.CONV, OpKind.MAX_POOL, OpKind.AVG_POOL)


class Action(StrEnum):
    """Action a rule takes on a match."""

    SPD_CONV = "spd-conv"  # SPD followed by a stride-1 conv
    SPD_MAX = "spd-max"  # SPD followed by a stride-free max (exact for max pooling)
    REMOVE = "remove"  # drop the op (pooling only)
    KEEP = "keep"  # leave the op as it is


class Order(StrEnum):
    """Position of SPD relative to the stride-1 conv."""

    # Sunkara & Luo (arXiv 2208.03641): SPD, then a conv that keeps the block's output channels.
    SPD_FIRST = "spd-first"
    CONV_FIRST = "conv-first"  # the authors' code: stride-1 conv, then SPD; consumers widen


class Fallback(StrEnum):
    """Behaviour of a conv-first rule when the widened channels cannot be carried downstream."""

    REFUSE = "refuse"
    SPD_FIRST = "spd-first"


class GroupsFilter(StrEnum):
    """Filter on a conv's groups."""

    ANY = "any"
    DENSE = "dense"  # groups == 1
    GROUPED = "grouped"  # 1 < groups < in_channels
    DEPTHWISE = "depthwise"  # groups == in_channels


@dataclass(frozen=True)
class KernelChoice:
    """The stride-1 kernel after SPD: the original size, the smallest exact one, or a given size."""

    mode: str  # "same", "compact" or "size"
    size: int | None = None

    def per_axis(self, op: WindowOp) -> list[int | None]:
        """Return the kernel size per axis; ``None`` requests the smallest that fits every tap."""
        if self.mode == "same":
            return list(op.kernel)
        if self.mode == "compact":
            return [None] * op.dims
        return [self.size] * op.dims

    def __str__(self) -> str:
        return str(self.size) if self.mode == "size" else self.mode


@dataclass(frozen=True)
class Rule:
    """One rewrite rule: a pattern over window ops and the replacement to build for a match.

    A field left at ``None`` (or empty) matches anything.
    """

    name: str
    ops: tuple[OpKind, ...] = MATCHABLE_KINDS
    dims: tuple[int, ...] = (1, 2, 3)
    form: str = "any"  # "module", "function" or "any"
    stride: tuple[int, ...] | None = None
    min_stride: int = 2
    kernel_size: tuple[int, ...] | None = None
    padding: tuple[int, ...] | None = None
    dilation: tuple[int, ...] | None = None
    groups: GroupsFilter | int = GroupsFilter.ANY
    patchify: bool | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    first: int | None = None
    action: Action = Action.SPD_CONV
    kernel: KernelChoice = KernelChoice("same")
    order: Order = Order.SPD_FIRST
    fallback: Fallback = Fallback.REFUSE
    description: str = ""
    source: str = ""  # "file:line" of the rule's table, for messages

    def matches(self, op: WindowOp, name: str, position: int | None) -> bool:
        """Check whether the op called ``name``, at downsampling ``position``, fits this rule."""
        checks = (
            op.kind in self.ops,
            op.dims in self.dims,
            self.form in ("any", op.form),
            max(op.stride) >= self.min_stride,
            self.stride is None or max(op.stride) in self.stride,
            self.kernel_size is None or max(op.kernel) in self.kernel_size,
            self.padding is None or max(op.padding) in self.padding,
            self.dilation is None or max(op.dilation) in self.dilation,
            self._groups_match(op),
            self.patchify is None or self.patchify == _is_patchify(op),
            not self.include or any(fnmatch.fnmatchcase(name, p) for p in self.include),
            not any(fnmatch.fnmatchcase(name, p) for p in self.exclude),
            self.first is None or (position is not None and position < self.first),
        )
        return all(checks)

    def _groups_match(self, op: WindowOp) -> bool:
        if isinstance(self.groups, int):
            return op.groups == self.groups
        if self.groups is GroupsFilter.ANY:
            return True
        if op.kind is not OpKind.CONV:
            return False
        depthwise = op.in_channels is not None and op.groups == op.in_channels and op.groups > 1
        if self.groups is GroupsFilter.DEPTHWISE:
            return depthwise
        if self.groups is GroupsFilter.GROUPED:
            return op.groups > 1 and not depthwise
        return op.groups == 1


def _is_patchify(op: WindowOp) -> bool:
    """Non-overlapping windows: kernel equals stride on every axis, with no padding or dilation."""
    return op.kernel == op.stride and not any(op.padding) and all(d == 1 for d in op.dilation)


@dataclass(frozen=True)
class RuleSet:
    """An ordered list of rules; the first rule that matches an op decides its fate."""

    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    channel_order: str = "unshuffle"
    source: str = ""

    def first_match(self, op: WindowOp, name: str, position: int | None) -> Rule | None:
        for rule in self.rules:
            if rule.matches(op, name, position):
                return rule
        return None
