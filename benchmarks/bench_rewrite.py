"""Time ``spd_rewrite.rewrite`` per phase, against a bare ``torch.fx`` trace as the floor.

For each model and input size the script runs the pass (``paper`` rules, fresh weights, batch 1,
graph mode) and splits its wall time into phases by wrapping the functions that
``spd_rewrite.pipeline`` calls, for the duration of the run only:

* ``copy``: the deep copy of the user's model;
* ``reference``: the forward of the original model, under ``FlopCounterMode``;
* ``trace``: tracing with leaf fallback;
* ``shapes``: the shape-propagation forward of the traced graph;
* ``match``, ``build`` (new modules, including PyTorch's weight initialisation), ``channels``,
  ``install``, ``leaves`` (module-level rewrite inside leaves), ``recompile`` (including lint);
* ``verify``: the forward of the rewritten graph under ``FlopCounterMode`` and the count of what is
  left to downsample;
* ``other``: the rest (report records, parameter counts).

The floor is ``torch.fx.symbolic_trace(model)`` plus ``recompile()``; where fx cannot trace the
whole model, the floor uses the pass's own tracer (``spd_rewrite.graph.trace.trace``). The goal is
``(total - verify) / floor <= 2``. Each figure comes from the fastest of ``--repeats`` runs after
one warm-up run (the phases from the fastest run of the pass). A phase called inside another timed
phase counts towards the outer one.

    python benchmarks/bench_rewrite.py [--quick] [--sizes 64,224] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
import torchvision
from bench_common import add_common_options, apply_threads, emit, machine_lines, synchronize, table
from torch import fx, nn

import spd_rewrite
from spd_rewrite import pipeline
from spd_rewrite.graph.trace import trace as spd_trace
from spd_rewrite.targets import build_target

TORCHVISION_MODELS = [
    "resnet50",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_y_400mf",
    "densenet121",
]
TARGETS = ["yolov5n", "yolov5s"]
QUICK_MODELS = ["resnet50", "yolov5s"]

# Phase name -> names in spd_rewrite.pipeline whose calls count towards it.
PHASES: dict[str, tuple[str, ...]] = {
    "copy": ("_copy",),
    "reference": ("run_model",),
    "trace": ("trace",),
    "shapes": ("propagate_shapes",),
    "match": ("find_candidates", "match_rules"),
    "build": ("build_replacement",),
    "channels": ("propagate_conv_first", "apply_channel_plan"),
    "install": ("install_block",),
    "leaves": ("rewrite_submodules",),
    "verify": ("verify",),
}
COLUMNS = [*PHASES, "recompile"]


def build_model(name: str) -> nn.Module:
    """Build a bundled YOLOv5 or ``-lowres`` target, or else a torchvision model (no weights)."""
    if name.startswith("yolov5") or "-" in name:
        return build_target(name).eval()
    return torchvision.models.get_model(name, weights=None).eval()


@contextlib.contextmanager
def phase_timers(seconds: dict[str, float], device: str) -> Iterator[None]:
    """Wrap the pipeline's phase functions and ``GraphModule.recompile`` to add up their time."""
    originals: dict[str, Callable] = {}
    # Only the outermost timed call counts, so a recompile inside tracing is counted once.
    depth = [0]

    def timed(phase: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            if depth[0]:
                return function(*args, **kwargs)
            depth[0] += 1
            synchronize(device)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                synchronize(device)
                seconds[phase] += time.perf_counter() - start
                depth[0] -= 1

        return wrapper

    for phase, names in PHASES.items():
        for name in names:
            originals[name] = getattr(pipeline, name)
            setattr(pipeline, name, timed(phase, originals[name]))
    recompile = fx.GraphModule.recompile
    lint = fx.Graph.lint
    fx.GraphModule.recompile = timed("recompile", recompile)
    fx.Graph.lint = timed("recompile", lint)
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(pipeline, name, function)
        fx.GraphModule.recompile = recompile
        fx.Graph.lint = lint


def time_rewrite(model: nn.Module, x: torch.Tensor, device: str) -> dict[str, float]:
    """Run the pass once and return seconds per phase, plus ``total`` and ``other``."""
    seconds: dict[str, float] = defaultdict(float)
    with phase_timers(seconds, device):
        synchronize(device)
        start = time.perf_counter()
        spd_rewrite.rewrite(model, x, "paper")
        synchronize(device)
        seconds["total"] = time.perf_counter() - start
    seconds["other"] = seconds["total"] - sum(seconds[phase] for phase in COLUMNS)
    return dict(seconds)


def time_floor(model: nn.Module) -> tuple[float, str]:
    """Return the seconds of a bare fx trace plus recompile, and which tracer gave them."""
    start = time.perf_counter()
    try:
        gm = fx.symbolic_trace(model)
        tracer = "symbolic_trace"
    except Exception:  # fx raises many types; fall back to the pass's tracer with leaves
        start = time.perf_counter()
        gm = spd_trace(model).gm
        tracer = "spd trace (leaves)"
    gm.recompile()
    return time.perf_counter() - start, tracer


def time_forward(model: nn.Module, x: torch.Tensor, device: str) -> float:
    """Return the seconds of one plain forward (no FLOP counting), after a warm-up call."""
    with torch.no_grad():
        model(x)
        synchronize(device)
        start = time.perf_counter()
        model(x)
        synchronize(device)
    return time.perf_counter() - start


def total_seconds(phases: dict[str, float]) -> float:
    return phases["total"]


def measure(name: str, size: int, repeats: int, device: str) -> dict[str, object]:
    """Time the pass, the floor and a plain forward for one model and input size."""
    model = build_model(name).to(device)
    x = torch.randn(1, 3, size, size, device=device)
    time_rewrite(model, x, device)  # warm-up: imports, kernel selection, caches
    # The fastest run of each: on a shared machine the noise only ever adds time.
    phases = min((time_rewrite(model, x, device) for _ in range(repeats)), key=total_seconds)
    floors = [time_floor(model) for _ in range(repeats)]
    floor = min(seconds for seconds, _ in floors)
    forward = min(time_forward(model, x, device) for _ in range(repeats))
    without_verify = phases["total"] - phases["verify"]
    return {
        "model": name,
        "size": size,
        "phases": phases,
        "floor": floor,
        "floor_tracer": floors[0][1],
        "forward": forward,
        "ratio": without_verify / floor,
        "ratio_total": phases["total"] / floor,
    }


def rows_of(results: list[dict[str, object]]) -> tuple[list[list[object]], list[list[object]]]:
    """Return the phase table rows and the summary rows (milliseconds and ratios)."""
    phase_rows, summary_rows = [], []
    for result in results:
        phases = result["phases"]
        phase_rows.append(
            [result["model"], result["size"]]
            + [phases.get(column, 0.0) * 1e3 for column in [*COLUMNS, "other", "total"]]
        )
        summary_rows.append(
            [
                result["model"],
                result["size"],
                result["floor"] * 1e3,
                result["floor_tracer"],
                result["forward"] * 1e3,
                phases["total"] * 1e3,
                result["ratio_total"],
                result["ratio"],
                "yes" if result["ratio"] <= 2.0 else "no",
            ]
        )
    return phase_rows, summary_rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(parser)
    parser.add_argument("--models", default=None, help="comma-separated model names")
    parser.add_argument("--sizes", default="64,224", help="comma-separated input sizes in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model and size")
    args = parser.parse_args(argv)
    apply_threads(args.threads)

    if args.models:
        models = args.models.split(",")
    else:
        models = QUICK_MODELS if args.quick else [*TORCHVISION_MODELS, *TARGETS]
    sizes = [64] if args.quick else [int(size) for size in args.sizes.split(",")]
    repeats = 1 if args.quick else args.repeats

    results = []
    for name in models:
        for size in sizes:
            results.append(measure(name, size, repeats, args.device))
            print(f"  measured {name} at {size} px", flush=True)

    phase_rows, summary_rows = rows_of(results)
    emit("\n## Rewrite time\n", args.markdown)
    emit("\n".join(f"- {line}" for line in machine_lines(args.device)) + "\n", args.markdown)
    emit("Per phase, milliseconds (fastest run, batch 1, `paper` rules):\n", args.markdown)
    emit(table(["model", "px", *COLUMNS, "other", "total"], phase_rows) + "\n", args.markdown)
    emit("Against the floor (bare fx trace plus recompile):\n", args.markdown)
    headers = [
        "model",
        "px",
        "floor ms",
        "floor tracer",
        "forward ms",
        "pass ms",
        "pass / floor",
        "pass without verify / floor",
        "goal (<= 2) met",
    ]
    emit(table(headers, summary_rows), args.markdown)


if __name__ == "__main__":
    main()
