"""The job behind ``spd-rewrite export``: load a saved folder or rewrite a spec, then export it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from spd_rewrite.errors import OutputFolderError
from spd_rewrite.export import export_onnx, export_pt2
from spd_rewrite.io.saved_folder import load, read_manifest
from spd_rewrite.job import RewriteJob, default_input_shape, parse_input_shape, run_job
from spd_rewrite.verify import run_model

__all__ = ["ExportJob", "run_export"]

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2")


@dataclass(frozen=True)
class ExportJob:
    """Everything ``spd-rewrite export`` takes."""

    model: str
    output: Path
    format: str = "onnx"
    input_shape: str | None = None
    rules: str = "paper"
    transfer: str = "fresh"
    weights: Path | None = None
    trust_pickle: bool = False
    opset: int = 17
    dynamic: bool = True


def run_export(job: ExportJob) -> Path:
    """Export a saved folder as is, or rewrite a model spec first; return the written file."""
    if job.format not in FORMATS:
        raise OutputFolderError(f"invalid --format {job.format!r}; use one of {', '.join(FORMATS)}")
    if job.output.exists() and job.output.is_dir():
        raise OutputFolderError(f"--output {str(job.output)!r} is a directory; name a file")

    folder = Path(job.model)
    if folder.is_dir() and (folder / "manifest.json").is_file():
        # A saved folder: export it as it is, at the input shape it was rewritten with.
        model = load(folder)
        recorded = read_manifest(folder).get("metadata", {}).get("input_shape")
        shape = parse_input_shape(job.input_shape) if job.input_shape else tuple(recorded or ())
        if not shape:
            shape = default_input_shape("")
    else:
        outcome = run_job(
            RewriteJob(
                model=job.model,
                input_shape=job.input_shape,
                rules=job.rules,
                transfer=job.transfer,
                weights=job.weights,
                trust_pickle=job.trust_pickle,
            )
        )
        model = outcome.result.model
        shape = outcome.result.report.input_shapes[0]

    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    # A wrong --input-shape fails here as a user error naming the shape, before any export.
    run_model(model.eval(), (example,))
    if job.format == "onnx":
        return export_onnx(model, example, job.output, opset=job.opset, dynamic=job.dynamic)
    return export_pt2(model, example, job.output, dynamic=job.dynamic)
