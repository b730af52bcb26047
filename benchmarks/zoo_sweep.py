"""Rewrite torchvision's classification models and detection/segmentation backbones with SPD-Conv.

Every model is built with ``weights=None`` and rewritten at batch 1 and its natural input size
(299 px for inception_v3, the ``image_size`` a ViT was built for, 224 px otherwise) with the
``paper`` rules. Each row of the table says whether fx traced the model whole or kept
submodules as leaves, and gives the ops replaced, the downsampling steps left, the parameters
before and after, and the wall time. The status is ``ok`` when no downsampling is left and the
output shapes are unchanged, and otherwise the reason for the failure.

    python benchmarks/zoo_sweep.py --models resnet18,googlenet --markdown zoo.md
    python benchmarks/zoo_sweep.py --jsonl results.jsonl          # append one line per model
    python benchmarks/zoo_sweep.py --render results.jsonl --markdown zoo.md

Large models take minutes each on a laptop CPU; ``--jsonl`` lets a long sweep run in parts.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

import spd_rewrite
from spd_rewrite.errors import SpdRewriteError

# Backbones of the detection and segmentation models: the attribute path of the CNN part.
DETECTION = torchvision.models.detection
SEGMENTATION = torchvision.models.segmentation
BACKBONE_PATHS = {
    **{name: "backbone.body" for name in torchvision.models.list_models(module=DETECTION)},
    **{name: "backbone" for name in torchvision.models.list_models(module=SEGMENTATION)},
}
# SSD backbones are plain feature extractors without a `body`.
BACKBONE_PATHS["ssd300_vgg16"] = "backbone"
BACKBONE_PATHS["ssdlite320_mobilenet_v3_large"] = "backbone"

# Input sizes of the backbones: what the detection models' transforms feed them at most.
BACKBONE_SIZES = {"ssd300_vgg16": 300, "ssdlite320_mobilenet_v3_large": 320}


@dataclass(frozen=True)
class SweepResult:
    """One row of the sweep table."""

    model: str
    input_size: int
    tracing: str  # "traced" or "leaves: a, b"
    replaced: int | None
    downsampling_left: int | None
    params_before: int | None
    params_after: int | None
    seconds: float
    status: str  # "ok" or the reason for the failure

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def classification_names() -> list[str]:
    """Return the names of torchvision's classification models."""
    return list(torchvision.models.list_models(module=torchvision.models))


def backbone_names() -> list[str]:
    """Return sweep names of the detection and segmentation backbones, e.g. ``x.backbone.body``."""
    return [f"{name}.{path}" for name, path in sorted(BACKBONE_PATHS.items())]


def build_model(name: str) -> tuple[nn.Module, int]:
    """Build the untrained model (or backbone) called ``name`` and return it with its input size."""
    model_name, _, path = name.partition(".")
    if path:
        model = torchvision.models.get_model(model_name, weights=None, weights_backbone=None)
        backbone = model.get_submodule(path)
        return backbone, BACKBONE_SIZES.get(model_name, 224)

    model = torchvision.models.get_model(model_name, weights=None)
    return model, natural_input_size(model_name, model)


def natural_input_size(name: str, model: nn.Module) -> int:
    """Return the input size a classification model is built for (224 when it accepts any)."""
    if name == "inception_v3":
        return 299
    image_size = getattr(model, "image_size", None)  # ViT checks its input size in forward
    if isinstance(image_size, int):
        return image_size
    return 224


def sweep_one(name: str, size: int | None = None) -> SweepResult:
    """Rewrite one model with the ``paper`` rules and check the result."""
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        model, natural = build_model(name)
    except Exception as error:  # a torchvision builder failing is a row of the table, not a crash
        return SweepResult(name, size or 0, "-", None, None, None, None, 0.0, _brief(error))
    size = size or natural
    model.eval()
    example = torch.randn(1, 3, size, size)

    try:
        result = spd_rewrite.rewrite(model, example, rules="paper", model_name=name)
    except SpdRewriteError as error:
        seconds = time.perf_counter() - start
        return SweepResult(name, size, "-", None, None, None, None, seconds, _brief(error))
    except Exception as error:  # any other exception is a bug in the pass; record it and go on
        seconds = time.perf_counter() - start
        status = "crash: " + _brief(error)
        return SweepResult(name, size, "-", None, None, None, None, seconds, status)
    seconds = time.perf_counter() - start

    report = result.report
    leaves = [leaf.name for leaf in report.leaves]
    tracing = "traced" if not leaves else "leaves: " + ", ".join(leaves)
    status = _status(report)
    return SweepResult(
        name,
        size,
        tracing,
        report.totals.replaced,
        report.totals.downsampling_left,
        report.totals.params_before,
        report.totals.params_after,
        seconds,
        status,
    )


def _status(report: spd_rewrite.RewriteReport) -> str:
    problems = []
    if report.totals.downsampling_left:
        problems.append("left: " + ", ".join(report.left))
    if report.output_shapes_before != report.output_shapes_after:
        problems.append(
            f"output shape {report.output_shapes_before} -> {report.output_shapes_after}"
        )
    return "; ".join(problems) or "ok"


def _brief(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def markdown_table(results: list[SweepResult]) -> str:
    """Return the results as a Markdown table followed by the success rate."""
    lines = [
        "| model | input | tracing | replaced | downsampling left | params before | "
        "params after | seconds | status |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in results:
        cells = [
            row.model,
            str(row.input_size),
            _tracing_cell(row.tracing),
            _number(row.replaced),
            _number(row.downsampling_left),
            _number(row.params_before),
            _number(row.params_after),
            f"{row.seconds:.1f}",
            row.status.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", success_line(results)]
    return "\n".join(lines) + "\n"


def _tracing_cell(tracing: str) -> str:
    """Shorten a long leaf list to its count and first name."""
    names = tracing.removeprefix("leaves: ").split(", ") if tracing.startswith("leaves: ") else []
    if len(names) <= 2:
        return tracing
    return f"{len(names)} leaves, e.g. {names[0]}"


def success_line(results: list[SweepResult]) -> str:
    """Return ``"Success: k of n models (p%)"``."""
    passed = sum(row.ok for row in results)
    total = len(results)
    rate = 100.0 * passed / total if total else 0.0
    return f"Success: {passed} of {total} models ({rate:.1f}%)"


def _number(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _print_row(row: SweepResult, write: Callable[[str], object]) -> None:
    write(
        f"{row.model:48} {row.input_size:4} {row.tracing[:24]:24} "
        f"{_number(row.replaced):>4} {_number(row.downsampling_left):>4} "
        f"{_number(row.params_before):>14} {_number(row.params_after):>14} "
        f"{row.seconds:7.1f}s  {row.status}\n"
    )


def load_results(path: Path) -> list[SweepResult]:
    """Read results that ``--jsonl`` appended; a later line for the same model wins."""
    rows: dict[str, SweepResult] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            data = json.loads(line)
            rows[data["model"]] = SweepResult(**data)
    return list(rows.values())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        help="comma-separated model names (default: every classification model and backbone); "
        "a backbone is written as <detection or segmentation model>.<attribute path>",
    )
    parser.add_argument(
        "--no-backbones", action="store_true", help="sweep only the classification models"
    )
    parser.add_argument("--size", type=int, help="input size in pixels for every model")
    parser.add_argument("--markdown", type=Path, help="write the table to this Markdown file")
    parser.add_argument("--jsonl", type=Path, help="append one JSON line per model to this file")
    parser.add_argument(
        "--render", type=Path, help="build the table from a --jsonl file instead of sweeping"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        results = load_results(args.render)
    else:
        if args.models:
            names = [name.strip() for name in args.models.split(",") if name.strip()]
        else:
            names = classification_names() + ([] if args.no_backbones else backbone_names())
        results = []
        for name in names:
            row = sweep_one(name, args.size)
            results.append(row)
            _print_row(row, sys.stdout.write)
            sys.stdout.flush()
            if args.jsonl:
                with args.jsonl.open("a", encoding="utf-8") as log:
                    log.write(json.dumps(asdict(row)) + "\n")
            gc.collect()

    table = markdown_table(results)
    print(success_line(results))
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    return 0 if all(row.ok for row in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
