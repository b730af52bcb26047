"""``spd-rewrite rewrite`` and ``spd-rewrite plan``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from spd_rewrite.cli.app import app, fail, stdout
from spd_rewrite.job import RewriteJob, run_job

__all__ = ["plan", "rewrite"]

logger = logging.getLogger(__name__)

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Model spec: package.module:callable, path/to/file.py:callable, a bundled target "
        "name (spd-rewrite targets), or a pickled model file with --trust-pickle.",
        show_default=False,
    ),
]
InputShape = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        help="Example input shape, comma-separated, e.g. 1,3,224,224 (default: the bundled "
        "target's natural size, else 1,3,224,224).",
    ),
]
Rules = Annotated[
    str,
    typer.Option("--rules", help="Built-in rule set name (spd-rewrite rules) or a .toml file."),
]
Transfer = Annotated[
    str,
    typer.Option(
        "--transfer",
        help="fresh: PyTorch's initialisation of new convs; exact: weights that keep the "
        "original function where the math allows.",
    ),
]
Mode = Annotated[
    str,
    typer.Option(
        "--mode",
        help="graph: trace with torch.fx; modules: swap conv/pool submodules in place and keep "
        "the model's class.",
    ),
]
Weights = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        help="State dict to load before rewriting (.safetensors, or .pt/.pth read with "
        "weights_only=True).",
    ),
]
TrustPickle = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow a pickled whole model as MODEL; unpickling runs code from the file.",
    ),
]
ReportPath = Annotated[
    Path | None, typer.Option("--report", help="Write the report to this .json or .md file.")
]
Leaf = Annotated[
    list[str] | None,
    typer.Option("--leaf", help="Qualified name of a submodule to keep whole (repeatable)."),
]
Explain = Annotated[
    bool,
    typer.Option("--explain", help="Also list the conv and pool nodes left alone, and why."),
]


@app.command()
def rewrite(
    model: ModelArg,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Folder to save the rewritten model in (loads with spd_rewrite.load)."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace --out if it exists and is not empty.")
    ] = False,
    input_shape: InputShape = None,
    rules: Rules = "paper",
    transfer: Transfer = "fresh",
    mode: Mode = "graph",
    weights: Weights = None,
    trust_pickle: TrustPickle = False,
    report: ReportPath = None,
    leaf: Leaf = None,
    explain: Explain = False,
    fuse: Annotated[
        bool,
        typer.Option(
            "--fuse",
            help="Save each SPDConv block whose fused form (one strided conv computing the same "
            "function) runs faster on the example input in that form.",
        ),
    ] = False,
    fuse_all: Annotated[
        bool,
        typer.Option(
            "--fuse-all", help="Save every SPDConv block that has a fused form in that form."
        ),
    ] = False,
) -> None:
    """Rewrite MODEL into SPD form, print the report and optionally save the result."""
    fuse_mode = None
    if fuse_all:
        fuse_mode = "all"
    elif fuse:
        fuse_mode = "measure"
    job = RewriteJob(
        model=model,
        input_shape=input_shape,
        rules=rules,
        transfer=transfer,
        mode=mode,
        weights=weights,
        trust_pickle=trust_pickle,
        leaf_modules=tuple(leaf or ()),
        out=out,
        force=force,
        report_path=report,
        fuse=fuse_mode,
    )
    _run(job, explain)


@app.command()
def plan(
    model: ModelArg,
    input_shape: InputShape = None,
    rules: Rules = "paper",
    transfer: Transfer = "fresh",
    mode: Mode = "graph",
    weights: Weights = None,
    trust_pickle: TrustPickle = False,
    report: ReportPath = None,
    leaf: Leaf = None,
    explain: Explain = False,
) -> None:
    """Run the whole rewrite of MODEL in memory and print the report; write no model."""
    # The same job as `rewrite` with no --out: RewriteJob's defaults save nothing.
    job = RewriteJob(
        model=model,
        input_shape=input_shape,
        rules=rules,
        transfer=transfer,
        mode=mode,
        weights=weights,
        trust_pickle=trust_pickle,
        leaf_modules=tuple(leaf or ()),
        report_path=report,
    )
    _run(job, explain)


def _run(job: RewriteJob, explain: bool) -> None:
    try:
        outcome = run_job(job)
    except Exception as error:  # fail() maps it to one line and an exit code (3 for bugs)
        fail(error)
        return

    stdout.print(outcome.result.report)
    if explain:
        for skip in outcome.result.report.skips:
            if not skip.downsampling:
                stdout.print(f"left alone {skip.name} {skip.op}: {skip.reason}", highlight=False)
    if outcome.fused:
        names = ", ".join(outcome.fused)
        stdout.print(f"fused {len(outcome.fused)} SPDConv blocks: {names}", highlight=False)
    if outcome.report_path is not None:
        stdout.print(f"report written to {outcome.report_path}", highlight=False)
    if outcome.out is not None:
        stdout.print(f"model saved to {outcome.out}", highlight=False)
