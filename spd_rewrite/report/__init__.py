"""The rewrite report: records, rich rendering, Markdown and JSON."""

from spd_rewrite.report.record import LayerRecord, LeafRecord, RewriteReport, SkipRecord, Totals
from spd_rewrite.report.writers import markdown, write_report

__all__ = [
    "LayerRecord",
    "LeafRecord",
    "RewriteReport",
    "SkipRecord",
    "Totals",
    "markdown",
    "write_report",
]
