"""Draw a rewrite report with rich."""

from __future__ import annotations

from collections.abc import Iterator

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from spd_rewrite.report.format import format_count, format_error, format_shape
from spd_rewrite.report.record import RewriteReport

__all__ = ["render"]

STYLE_NAME = "bold"
STYLE_BEFORE = "red"
STYLE_AFTER = "green"
STYLE_NOTE = "yellow"
STYLE_DIM = "dim"


def render(report: RewriteReport) -> Iterator[RenderableType]:
    """Yield the renderables of ``report``: the layer table, then summary lines."""
    table = Table(
        title=f"SPD rewrite of {report.model} (rules: {report.rules}, transfer: {report.transfer})",
        show_lines=False,
    )
    table.add_column("layer", style=STYLE_NAME, no_wrap=True)
    table.add_column("before -> after")
    table.add_column("in -> out shape")
    table.add_column("params", justify="right")
    table.add_column("FLOPs", justify="right")
    table.add_column("transfer")
    for layer in report.layers:
        ops = Text(layer.op, style=STYLE_BEFORE)
        ops.append("\n-> ")
        ops.append(layer.replacement, style=STYLE_AFTER)
        transfer = layer.transfer
        if layer.max_abs_error is not None:
            transfer += f"\n{format_error(layer.max_abs_error)}"
        table.add_row(
            layer.name,
            ops,
            f"{format_shape(layer.in_shape)}\n-> {format_shape(layer.out_shape)}",
            f"{format_count(layer.params_before)}\n-> {format_count(layer.params_after)}",
            f"{format_count(layer.flops_before)}\n-> {format_count(layer.flops_after)}",
            transfer,
        )
    yield table

    totals = report.totals
    summary = Text()
    summary.append(f"replaced {totals.replaced}, downsampling left {totals.downsampling_left}")
    summary.append(f", leaves {totals.leaves}\n")
    summary.append(
        f"parameters {format_count(totals.params_before)} -> {format_count(totals.params_after)}"
        f", FLOPs {format_count(totals.flops_before)} -> {format_count(totals.flops_after)}"
    )
    if totals.max_abs_error is not None:
        summary.append(f", max abs output error {format_error(totals.max_abs_error)}")
    yield summary

    for skip in report.skips:
        if skip.downsampling:
            yield Text(f"kept {skip.name} {skip.op}: {skip.reason}", style=STYLE_NOTE)
    for leaf in report.leaves:
        yield Text(f"leaf {leaf.name} ({leaf.module_type}): {leaf.reason}", style=STYLE_DIM)
    for edit in report.channel_edits:
        yield Text(f"channels {edit}", style=STYLE_DIM)
    for warning in report.warnings:
        yield Text(f"warning: {warning}", style=STYLE_NOTE)
