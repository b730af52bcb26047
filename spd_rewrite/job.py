"""The main job behind ``spd-rewrite rewrite``: load a model spec, rewrite it, save the results.

The CLI only parses options into a :class:`RewriteJob` and renders the outcome, so everything it
does is available from Python too.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from spd_rewrite.errors import InputShapeError, OutputFolderError
from spd_rewrite.io.checkpoint import apply_state_dict, read_state_dict
from spd_rewrite.io.saved_folder import save
from spd_rewrite.io.spec import load_model
from spd_rewrite.ops.fused import fuse_spd_convs
from spd_rewrite.pipeline import RewriteResult, rewrite
from spd_rewrite.report.writers import write_report

__all__ = ["JobOutcome", "RewriteJob", "default_input_shape", "parse_input_shape", "run_job"]

logger = logging.getLogger(__name__)

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)


@dataclass(frozen=True)
class RewriteJob:
    """Everything the ``rewrite`` and ``plan`` commands take."""

    model: str
    input_shape: str | None = None
    rules: str = "paper"
    transfer: str = "fresh"
    mode: str = "graph"
    weights: Path | None = None
    trust_pickle: bool = False
    leaf_modules: tuple[str, ...] = ()
    out: Path | None = None
    force: bool = False
    report_path: Path | None = None
    seed: int = 0
    fuse: str | None = None  # None, "measure" or "all"; see spd_rewrite.ops.fused


@dataclass(frozen=True)
class JobOutcome:
    """The rewrite result and where its files went."""

    result: RewriteResult
    out: Path | None
    report_path: Path | None
    fused: tuple[str, ...] = ()  # SPDConv blocks saved in their fused form


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` into a shape; raise ``InputShapeError`` with the fix."""
    parts = [part.strip() for part in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        shape = ()
    if len(shape) < 3 or any(size < 1 for size in shape):
        raise InputShapeError(
            f"invalid --input-shape {text!r}; give the batch, channels and spatial sizes as "
            "positive integers separated by commas, such as 1,3,224,224"
        )
    return shape


def default_input_shape(spec: str) -> tuple[int, ...]:
    """Return a bundled target's natural input shape, else ``1,3,224,224``."""
    try:
        from spd_rewrite.targets import get_target

        info = get_target(spec)
    except Exception:  # not a target name (or the targets cannot load): use the default
        return DEFAULT_INPUT_SHAPE
    return (1, 3, info.input_size, info.input_size)


def run_job(job: RewriteJob) -> JobOutcome:
    """Load, rewrite, verify and save as ``job`` requests; leave no partial output on failure."""
    shape = (
        parse_input_shape(job.input_shape) if job.input_shape else default_input_shape(job.model)
    )
    _check_outputs(job)

    torch.manual_seed(job.seed)
    model = load_model(job.model, trust_pickle=job.trust_pickle)
    if job.weights is not None:
        apply_state_dict(model, read_state_dict(job.weights), source=str(job.weights))

    example = torch.randn(shape, generator=torch.Generator().manual_seed(job.seed))
    torch.manual_seed(job.seed)
    result = rewrite(
        model,
        example,
        job.rules,
        transfer=job.transfer,
        mode=job.mode,
        leaf_modules=job.leaf_modules,
        model_name=job.model,
    )

    saved_model, fused = result.model, ()
    if job.fuse is not None:
        saved_model, names = fuse_spd_convs(result.model, example, force=job.fuse == "all")
        fused = tuple(names)

    out = None
    out_existed = job.out is not None and job.out.exists()
    if job.out is not None:
        metadata = {
            "model": job.model,
            "rules": job.rules,
            "transfer": job.transfer,
            "mode": job.mode,
            "input_shape": list(shape),
            "weights": str(job.weights) if job.weights else None,
            "fused": list(fused),
        }
        extra = {
            "report.json": result.report.to_json(),
            "report.md": result.report.to_markdown(),
        }
        out = save(saved_model, job.out, metadata=metadata, extra_files=extra, force=job.force)

    report_path = None
    if job.report_path is not None:
        try:
            report_path = write_report(result.report, job.report_path)
        except BaseException:
            # The report may go inside --out, so it is written after the folder is saved. A
            # failure removes the folder if this job created it, but a folder that --force
            # replaced cannot be restored.
            if out is not None and not out_existed:
                shutil.rmtree(out, ignore_errors=True)
            raise
    return JobOutcome(result, out, report_path, fused)


def _check_outputs(job: RewriteJob) -> None:
    """Reject unusable output paths before any work, so a failure leaves nothing behind."""
    if job.out is not None and job.out.exists():
        if not job.out.is_dir():
            raise OutputFolderError(f"--out {str(job.out)!r} is a file; name a folder")
        if any(job.out.iterdir()) and not job.force:
            raise OutputFolderError(
                f"output folder {str(job.out)!r} exists and is not empty; pass --force to "
                "replace it or choose another --out"
            )
    if job.report_path is not None:
        if job.report_path.suffix not in (".json", ".md", ".markdown"):
            raise OutputFolderError(
                f"report file {str(job.report_path)!r} has an unknown extension; use .json or .md"
            )
        if job.report_path.is_dir():
            raise OutputFolderError(
                f"report path {str(job.report_path)!r} is a directory; name a .json or .md file"
            )
        parent = _first_existing_parent(job.report_path)
        if not parent.is_dir():
            raise OutputFolderError(
                f"report path {str(job.report_path)!r} cannot be created because "
                f"{str(parent)!r} is a file; name a report path inside a folder"
            )


def _first_existing_parent(path: Path) -> Path:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent
