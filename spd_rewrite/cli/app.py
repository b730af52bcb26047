"""The ``spd-rewrite`` command line: parse, call the library, render, map errors to exit codes.

Exit codes:

* 0: success;
* 1: the pass refused to emit a model (verification or channel propagation failed);
* 2: bad input (model spec, weights, rule file, input shape, output folder) or a failed file
  operation such as a full disk;
* 3: an unexpected internal error, which is a bug: rerun with ``--debug`` and report the traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from spd_rewrite.errors import SpdRewriteError

__all__ = ["app", "main"]

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3

app = typer.Typer(
    name="spd-rewrite",
    help="Rewrite the strided convolutions and pooling of a PyTorch CNN into SPD-Conv.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Wide enough that choice lists such as the training recipes are not cut off.
    context_settings={"max_content_width": 120},
)

# Off a terminal (pipes, files, CI logs) rich would wrap the report table at 80 columns.
_PIPE_WIDTH = 160
stdout = Console(width=None if sys.stdout.isatty() else _PIPE_WIDTH)
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else _PIPE_WIDTH)


class _State:
    debug = False


@app.callback()
def _configure(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="Log more: -v info, -vv debug.")
    ] = 0,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of an error.")
    ] = False,
) -> None:
    _State.debug = debug
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose >= 2:
        level = logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=stderr, show_time=False, show_path=False)],
        force=True,
    )


def fail(error: BaseException) -> None:
    """Print ``error`` as one line on stderr and exit with its code (traceback with --debug).

    An ``SpdRewriteError`` exits with its ``exit_code``, an ``OSError`` with 2, anything else
    with 3.
    """
    if _State.debug:
        stderr.print_exception(show_locals=False)
    if isinstance(error, SpdRewriteError):
        stderr.print(f"[bold red]error:[/] {error}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code)
    if isinstance(error, OSError):
        # A file-system failure (disk full, permission denied) is not a bug in spd-rewrite.
        where = f" on {error.filename!r}" if error.filename else ""
        reason = error.strerror or str(error)
        stderr.print(
            f"[bold red]error:[/] file operation failed{where}: {reason}",
            markup=True,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    stderr.print(
        f"[bold red]internal error:[/] {type(error).__name__}: {message} "
        "(rerun with --debug for the traceback and report it)",
        markup=True,
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(EXIT_INTERNAL)


def _register_commands() -> None:
    # Importing the command modules registers their commands on `app`.
    from spd_rewrite.cli import (  # noqa: F401
        export_cmd,
        rewrite_cmd,
        rules_cmd,
        targets_cmd,
        train_cmd,
    )


def main() -> None:
    """Run the CLI (the ``spd-rewrite`` console script)."""
    _register_commands()
    # `--debug` is a global option; accept it after the subcommand too, where users type it.
    arguments = sys.argv[1:]
    if "--debug" in arguments[1:] and arguments[0] != "--debug":
        arguments = ["--debug", *(a for a in arguments if a != "--debug")]
    try:
        app(args=arguments, prog_name="spd-rewrite")
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)


_register_commands()
