"""``spd-rewrite export``: write a rewritten model as ONNX or a torch.export program."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spd_rewrite.cli.app import app, fail, stdout
from spd_rewrite.cli.rewrite_cmd import InputShape, Rules, Transfer, TrustPickle, Weights
from spd_rewrite.export_job import ExportJob, run_export

__all__ = ["export"]


@app.command()
def export(
    model: Annotated[
        str,
        typer.Argument(
            help="A folder saved by spd-rewrite rewrite --out, or a model spec to rewrite first.",
            show_default=False,
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    file_format: Annotated[
        str, typer.Option("--format", help="onnx (checked in onnxruntime) or pt2 (torch.export).")
    ] = "onnx",
    input_shape: InputShape = None,
    rules: Rules = "paper",
    transfer: Transfer = "fresh",
    weights: Weights = None,
    trust_pickle: TrustPickle = False,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset version.")] = 17,
    dynamic: Annotated[
        bool,
        typer.Option("--dynamic/--static", help="Dynamic batch and spatial size where possible."),
    ] = True,
) -> None:
    """Export MODEL, verified numerically against PyTorch, as ONNX or a .pt2 program."""
    job = ExportJob(
        model=model,
        output=output,
        format=file_format,
        input_shape=input_shape,
        rules=rules,
        transfer=transfer,
        weights=weights,
        trust_pickle=trust_pickle,
        opset=opset,
        dynamic=dynamic,
    )
    try:
        written = run_export(job)
    except Exception as error:  # fail() maps it to one line and an exit code (3 for bugs)
        fail(error)
        return
    stdout.print(f"exported to {written}", highlight=False)
