"""``spd-rewrite targets``: the bundled models, baselines and SPD versions side by side."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from spd_rewrite.cli.app import app, fail, stdout
from spd_rewrite.errors import SpdRewriteError

__all__ = ["targets"]


@app.command()
def targets(
    measure: Annotated[
        bool,
        typer.Option(
            "--measure/--no-measure",
            help="Build every target to count parameters, GFLOPs and downsampling left (slow).",
        ),
    ] = False,
    only: Annotated[
        str | None,
        typer.Option("--only", help="Comma-separated target names to list (default: all)."),
    ] = None,
) -> None:
    """List the bundled targets; with --measure, also parameters, GFLOPs and downsampling left."""
    from spd_rewrite.targets import list_targets
    from spd_rewrite.targets.summary import summarize

    try:
        infos = list_targets()
        if only:
            wanted = {name.strip() for name in only.split(",")}
            infos = [info for info in infos if info.name in wanted]
        table = Table(title="Bundled targets")
        table.add_column("name", style="bold", no_wrap=True)
        table.add_column("task")
        table.add_column("input", justify="right")
        columns = ("params", "GFLOPs", "downsampling left")
        if measure:
            for column in columns:
                table.add_column(column, justify="right")
        table.add_column("description")
        for info in infos:
            row = [info.name, info.task, str(info.input_size)]
            if measure:
                summary = summarize(info.name)
                row += [
                    f"{summary.params:,}",
                    f"{summary.gflops:.2f}",
                    str(summary.downsampling_left),
                ]
            row.append(info.description)
            table.add_row(*row)
    except SpdRewriteError as error:
        fail(error)
        return
    stdout.print(table)
