"""Markdown and JSON files of a rewrite report."""

from __future__ import annotations

from pathlib import Path

from spd_rewrite.errors import OutputFolderError
from spd_rewrite.report.format import format_count, format_error, format_shape
from spd_rewrite.report.record import RewriteReport

__all__ = ["markdown", "write_report"]


def markdown(report: RewriteReport) -> str:
    """Return ``report`` as Markdown: a summary, the replaced layers, skips and leaves."""
    totals = report.totals
    lines = [
        f"# SPD rewrite of {report.model}",
        "",
        f"- rule set: `{report.rules}`, mode: `{report.mode}`, transfer: `{report.transfer}`",
        f"- input shape: {', '.join(format_shape(s) for s in report.input_shapes)}",
        f"- replaced: {totals.replaced}, downsampling left: {totals.downsampling_left}, "
        f"leaves: {totals.leaves}",
        f"- parameters: {format_count(totals.params_before)} -> "
        f"{format_count(totals.params_after)}",
        f"- FLOPs: {format_count(totals.flops_before)} -> {format_count(totals.flops_after)}",
    ]
    if totals.max_abs_error is not None:
        lines.append(f"- max abs output error: {format_error(totals.max_abs_error)}")

    lines += [
        "",
        "## Replaced layers",
        "",
        "| layer | before | after | in shape | out shape | params | FLOPs | transfer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer in report.layers:
        transfer = layer.transfer
        if layer.max_abs_error is not None:
            transfer += f" ({format_error(layer.max_abs_error)})"
        lines.append(
            f"| `{layer.name}` | {layer.op} | {layer.replacement} | "
            f"{format_shape(layer.in_shape)} | {format_shape(layer.out_shape)} | "
            f"{format_count(layer.params_before)} -> {format_count(layer.params_after)} | "
            f"{format_count(layer.flops_before)} -> {format_count(layer.flops_after)} | "
            f"{transfer} |"
        )

    if report.channel_edits:
        lines += ["", "## Channel edits", ""]
        lines += [f"- `{edit}`" for edit in report.channel_edits]
    skipped = [s for s in report.skips if s.downsampling]
    if skipped:
        lines += ["", "## Downsampling steps kept", ""]
        lines += [f"- `{s.name}` {s.op}: {s.reason}" for s in skipped]
    if report.leaves:
        lines += ["", "## Leaves", ""]
        lines += [f"- `{leaf.name}` ({leaf.module_type}): {leaf.reason}" for leaf in report.leaves]
    if report.warnings:
        lines += ["", "## Warnings", ""]
        lines += [f"- {warning}" for warning in report.warnings]
    return "\n".join(lines) + "\n"


def write_report(report: RewriteReport, path: str | Path) -> Path:
    """Write ``report`` to ``path`` as JSON (``.json``) or Markdown (``.md``)."""
    path = Path(path)
    if path.suffix == ".json":
        text = report.to_json()
    elif path.suffix in (".md", ".markdown"):
        text = markdown(report)
    else:
        raise OutputFolderError(
            f"report file {str(path)!r} has an unknown extension; use .json or .md"
        )
    if path.is_dir():
        raise OutputFolderError(
            f"report path {str(path)!r} is a directory; name a .json or .md file"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    except OSError as error:
        raise OutputFolderError(f"cannot write report {str(path)!r}: {error.strerror}") from error
    return path
