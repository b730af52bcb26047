"""The rewrite report: what was replaced, skipped and kept as a leaf, with totals.

The report is data. :mod:`spd_rewrite.report.render` draws it with rich, and
:mod:`spd_rewrite.report.writers` writes it as Markdown or JSON. It reads the plan and the
verification record; it never inspects a graph.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerRecord", "LeafRecord", "RewriteReport", "SkipRecord", "Totals"]


@dataclass(frozen=True)
class LayerRecord:
    """One replaced op."""

    name: str
    op: str
    action: str
    replacement: str
    rule: str
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    transfer: str
    max_abs_error: float | None = None
    location: str = ""


@dataclass(frozen=True)
class SkipRecord:
    """A conv or pooling node the pass left alone, and why."""

    name: str
    op: str
    reason: str
    downsampling: bool
    location: str = ""


@dataclass(frozen=True)
class LeafRecord:
    """A submodule traced as one node, and why."""

    name: str
    module_type: str
    reason: str


@dataclass(frozen=True)
class Totals:
    """Whole-model figures. FLOPs count 2 per multiply-add of convs and matrix products."""

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    downsampling_left: int
    replaced: int
    leaves: int
    max_abs_error: float | None = None


@dataclass(frozen=True)
class RewriteReport:
    """Everything a rewrite did, as plain data."""

    model: str
    rules: str
    mode: str
    transfer: str
    input_shapes: tuple[tuple[int, ...], ...]
    layers: tuple[LayerRecord, ...]
    skips: tuple[SkipRecord, ...]
    leaves: tuple[LeafRecord, ...]
    totals: Totals
    output_shapes_before: Any = None
    output_shapes_after: Any = None
    left: tuple[str, ...] = ()
    unused_rules: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    channel_edits: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready data (``layers``, ``totals``, ``skipped``, ...)."""
        data = asdict(self)
        data["skipped"] = data.pop("skips")
        data["downsampling_left_names"] = data.pop("left")
        return _jsonable(data)

    def to_json(self) -> str:
        """Return the report as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def to_markdown(self) -> str:
        """Return the report as a Markdown document."""
        from spd_rewrite.report.writers import markdown

        return markdown(self)

    def __rich_console__(self, console, options):  # noqa: ANN001 - rich's protocol
        from spd_rewrite.report.render import render

        yield from render(self)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value
