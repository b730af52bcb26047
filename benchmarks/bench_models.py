"""Forward latency, peak memory, FLOPs and parameters of the bundled targets and their SPD versions.

For each baseline the script builds five variants:

* ``baseline``: the bundled model;
* ``paper``: the ``paper`` rules (stride-1 convs keep their kernel size; patchify ops get 1x1);
* ``paper-compact``: the ``paper`` rules with ``kernel = "compact"`` for every rule, the smallest
  stride-1 kernel that holds the original taps (a rule file written at run time);
* ``paper-fused``: ``paper`` with every ``SPDConv`` block in its fused form
  (``spd_rewrite.ops.fused.fuse_spd_convs(force=True)``), the same function as ``paper``;
* ``reference``: the ``reference`` rules (the authors' released layout, conv-first).

Latency is the median of ``torch.utils.benchmark.Timer.blocked_autorange`` under
``torch.no_grad``, in eval mode. Peak memory on the CPU is measured in a fresh subprocess per model
and batch size, which loads the saved model, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), runs one forward and reads ``VmHWM`` minus the RSS before the forward:
the memory the forward itself adds, as the OS sees it. On CUDA it is
``torch.cuda.max_memory_allocated`` during the forward. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` at batch 1 (multiply-adds count as 2 FLOPs).

    python benchmarks/bench_models.py [--quick] [--no-compile] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_common import add_common_options, apply_threads, emit, machine_lines, table
from torch import nn
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

import spd_rewrite
from spd_rewrite.errors import OutputFolderError
from spd_rewrite.ops.fused import fuse_spd_convs
from spd_rewrite.rules.loader import load_rule_set
from spd_rewrite.targets import build_target, get_target


@dataclass(frozen=True)
class Baseline:
    """One bundled baseline, its input size and the batch sizes measured."""

    name: str
    size: int
    batches: tuple[int, ...]


# Batch 32 only for the low-resolution targets. At 224 or 640 px a batch of 32 would take seconds
# per forward on a 2-core CPU (an estimate from the batch-1 times), too long for a 10-minute run.
BASELINES = [
    Baseline("resnet18-lowres", 32, (1, 32)),
    Baseline("resnet50-lowres", 32, (1, 32)),
    Baseline("resnet50", 224, (1,)),
    Baseline("yolov5s", 640, (1,)),
]
QUICK_BASELINES = [Baseline("resnet18-lowres", 32, (1, 32))]
# Variants measured again under torch.compile (compiling takes tens of seconds each on a CPU).
COMPILE_BASELINES = ["resnet18-lowres"]
COMPILE_VARIANTS = ["baseline", "paper", "paper-fused"]

COMPACT_RULES = """\
name = "paper-compact"
description = "The paper rules with the smallest stride-1 kernel that holds every original tap."

[[rule]]
name = "all"
op = ["conv", "max_pool", "avg_pool"]
action = "spd-conv"
kernel = "compact"
"""


def build_variants(baseline: Baseline, rules_folder: Path) -> dict[str, nn.Module]:
    """Build the five variants of one baseline, in eval mode."""
    info = get_target(baseline.name)
    example = torch.randn(1, 3, info.rewrite_input_size, info.rewrite_input_size)
    compact_file = rules_folder / "paper-compact.toml"
    compact_file.write_text(COMPACT_RULES)
    compact_rules = load_rule_set(compact_file)

    variants = {"baseline": build_target(baseline.name)}
    variants["paper"] = build_target(baseline.name + "-spd")
    variants["paper-compact"] = spd_rewrite.rewrite(
        build_target(baseline.name), example, compact_rules
    ).model
    variants["paper-fused"] = fuse_spd_convs(variants["paper"], force=True)[0]
    variants["reference"] = build_target(baseline.name + "-spd-reference")
    if info.task == "detection":
        # The Detect head of a rewritten model needs its strides measured (build_target does
        # this for the named SPD targets).
        from spd_rewrite.targets.yolov5 import compute_strides

        compute_strides(variants["paper-compact"], 3)
    return {name: model.eval() for name, model in variants.items()}


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def latency(model: nn.Module, x: torch.Tensor, min_run_time: float) -> float:
    """Return the median seconds of one forward."""
    timer = Timer("model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads())
    # Timer runs the statement in this thread, so the no_grad context applies to it.
    with torch.no_grad():
        model(x)  # warm-up outside the timer, so first-call costs stay out
        return timer.blocked_autorange(min_run_time=min_run_time).median


def store(model: nn.Module, path: Path) -> Path:
    """Write ``model`` where a memory worker can load it; return the folder or file."""
    try:
        return spd_rewrite.save(model, path)
    except OutputFolderError:
        # Not every baseline fits the saved-folder format (YOLOv5 keeps a frozenset attribute).
        # Pickling is the fallback only, because GraphModules from the pass do not unpickle: fx
        # re-traces them with the pass's tracer class, whose constructor takes an argument.
        file = path.with_suffix(".pt")
        torch.save(model, file)
        return file


def peak_memory(path: Path, shape: tuple[int, ...], device: str, threads: int) -> float:
    """Return the MiB one forward adds, measured in a fresh subprocess."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-worker",
        str(path),
        "--shape",
        ",".join(map(str, shape)),
        "--device",
        device,
        "--threads",
        str(threads),
    ]
    output = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if output.returncode != 0:
        raise RuntimeError(f"memory worker failed for {path}: {output.stderr.strip()[-2000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])["mib"]


def memory_worker(path: str, shape: str, device: str) -> None:
    """Load one stored model, run one forward and print the memory it added as JSON."""
    if Path(path).is_dir():
        model = spd_rewrite.load(path)
    else:
        # A model this script pickled a moment ago, so unpickling it is safe.
        model = torch.load(path, weights_only=False)
    model = model.eval().to(device)
    x = torch.randn(*[int(size) for size in shape.split(",")], device=device)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            model(x)
        torch.cuda.synchronize()
        added = torch.cuda.max_memory_allocated() - before
    else:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # reset VmHWM to the current RSS
        before = _status_kib("VmRSS")
        with torch.no_grad():
            model(x)
        added = (_status_kib("VmHWM") - before) * 1024
    print(json.dumps({"mib": added / 2**20}))


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match.group(1))


def measure(args: argparse.Namespace) -> tuple[list[list[object]], list[list[object]]]:
    """Measure every baseline's variants; return the eager rows and the torch.compile rows."""
    baselines = QUICK_BASELINES if args.quick else BASELINES
    min_run_time = 0.3 if args.quick else 1.0
    threads = torch.get_num_threads()
    rows, compile_rows = [], []
    with tempfile.TemporaryDirectory(prefix="spd-bench-") as temp:
        temp_path = Path(temp)
        for baseline in baselines:
            variants = build_variants(baseline, temp_path)
            x1 = torch.randn(1, 3, baseline.size, baseline.size)
            base_latency: dict[int, float] = {}
            for variant, model in variants.items():
                path = store(model, temp_path / f"{baseline.name}-{variant}")
                params = sum(p.numel() for p in model.parameters())
                flops = count_flops(model, x1)
                model.to(args.device)
                for batch in baseline.batches:
                    shape = (batch, 3, baseline.size, baseline.size)
                    x = torch.randn(shape, device=args.device)
                    seconds = latency(model, x, min_run_time)
                    base_latency.setdefault(batch, seconds)
                    mib = peak_memory(path, shape, args.device, threads)
                    rows.append(
                        [
                            baseline.name,
                            baseline.size,
                            variant,
                            batch,
                            params / 1e6,
                            flops / 1e9,
                            seconds * 1e3,
                            seconds / base_latency[batch],
                            mib,
                        ]
                    )
                print(f"  measured {baseline.name} {variant}", flush=True)
            if not args.no_compile and not args.quick and baseline.name in COMPILE_BASELINES:
                compile_rows += measure_compiled(baseline, variants, args.device, min_run_time)
    return rows, compile_rows


def measure_compiled(
    baseline: Baseline, variants: dict[str, nn.Module], device: str, min_run_time: float
) -> list[list[object]]:
    """Time the chosen variants under ``torch.compile`` (default backend) at batch 1."""
    rows = []
    x = torch.randn(1, 3, baseline.size, baseline.size, device=device)
    for variant in COMPILE_VARIANTS:
        model = variants[variant]
        eager = latency(model, x, min_run_time)
        start = time.perf_counter()
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(x)
        compile_seconds = time.perf_counter() - start
        seconds = latency(compiled, x, min_run_time)
        rows.append(
            [baseline.name, baseline.size, variant, 1, compile_seconds, eager * 1e3, seconds * 1e3]
        )
        print(f"  compiled {baseline.name} {variant}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(parser)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile table")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.memory_worker:
        memory_worker(args.memory_worker, args.shape, args.device)
        return

    rows, compile_rows = measure(args)
    emit("\n## Emitted models: latency, memory, FLOPs, parameters\n", args.markdown)
    emit("\n".join(f"- {line}" for line in machine_lines(args.device)) + "\n", args.markdown)
    headers = [
        "baseline",
        "px",
        "variant",
        "batch",
        "params M",
        "GFLOPs (batch 1)",
        "latency ms",
        "latency / baseline",
        "forward peak MiB",
    ]
    emit(table(headers, rows) + "\n", args.markdown)
    if compile_rows:
        emit("torch.compile (default inductor backend), batch 1:\n", args.markdown)
        headers = ["baseline", "px", "variant", "batch", "compile s", "eager ms", "compiled ms"]
        emit(table(headers, compile_rows), args.markdown)


if __name__ == "__main__":
    main()
