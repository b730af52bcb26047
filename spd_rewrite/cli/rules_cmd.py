"""``spd-rewrite rules``: list the built-in rule sets or print one."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.syntax import Syntax
from rich.table import Table

from spd_rewrite.cli.app import app, fail, stdout
from spd_rewrite.errors import SpdRewriteError
from spd_rewrite.rules.loader import builtin_rule_sets, builtin_source

__all__ = ["rules"]


@app.command()
def rules(
    name: Annotated[
        str | None,
        typer.Argument(help="A built-in rule set to print as TOML; omit to list them all."),
    ] = None,
) -> None:
    """List the built-in rule sets, or print the TOML of one."""
    try:
        if name is None:
            table = Table(title="Built-in rule sets")
            table.add_column("name", style="bold", no_wrap=True)
            table.add_column("description")
            for set_name, description in builtin_rule_sets().items():
                table.add_row(set_name, description)
            stdout.print(table)
            return
        text = builtin_source(name)
    except SpdRewriteError as error:
        fail(error)
        return
    if stdout.is_terminal:
        stdout.print(Syntax(text, "toml"))
    else:
        stdout.out(text, end="", highlight=False)
