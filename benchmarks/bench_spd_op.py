"""Time the space-to-depth op against a plain copy of the same bytes and against slicing.

For each input shape, dtype and memory layout the table lists, in milliseconds per call:

* ``copy``: ``x.clone()``, the memory-bandwidth floor (SPD reads and writes every element once);
* ``spd unshuffle`` and ``spd reference``: :func:`spd_rewrite.space_to_depth` in either channel
  order;
* ``slicing``: the slicing-and-concatenation formulation of the SPD-Conv authors' code,
  ``torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)``.

The goal is ``spd / copy <= 1.2`` and ``spd < slicing``. Timing uses ``torch.utils.benchmark.Timer``
(warm-up, median of blocked runs).

    python benchmarks/bench_spd_op.py [--quick] [--device cuda] [--threads N]
"""

from __future__ import annotations

import argparse

import torch
from bench_common import add_common_options, apply_threads, emit, machine_lines, table
from torch.utils.benchmark import Timer

from spd_rewrite import space_to_depth

SHAPES = [(32, 64, 160, 160), (32, 256, 40, 40)]
QUICK_SHAPES = [(8, 64, 80, 80)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
GOAL_OF_COPY = 1.2


def slicing(x: torch.Tensor) -> torch.Tensor:
    """SPD written as four strided slices and a concatenation (the authors' formulation)."""
    return torch.cat(
        [x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1
    )


def median_seconds(statement: str, x: torch.Tensor, min_run_time: float) -> float:
    """Return the median seconds of ``statement`` on ``x`` (Timer adds warm-up and sync)."""
    timer = Timer(
        statement,
        globals={"x": x, "slicing": slicing, "space_to_depth": space_to_depth},
        num_threads=torch.get_num_threads(),
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median


def measure(args: argparse.Namespace) -> list[list[object]]:
    """Time every case and return the table rows."""
    shapes = QUICK_SHAPES if args.quick else SHAPES
    min_run_time = 0.2 if args.quick else 1.0
    rows = []
    for shape in shapes:
        for dtype_name, dtype in DTYPES.items():
            for layout_name, layout in LAYOUTS.items():
                x = (
                    torch.randn(shape, device=args.device)
                    .to(dtype)
                    .contiguous(memory_format=layout)
                )
                check_exact(x)
                copy = median_seconds("x.clone()", x, min_run_time)
                unshuffle = median_seconds("space_to_depth(x, (2, 2))", x, min_run_time)
                reference = median_seconds(
                    "space_to_depth(x, (2, 2), order='reference')", x, min_run_time
                )
                sliced = median_seconds("slicing(x)", x, min_run_time)
                best = min(unshuffle, reference)
                rows.append(
                    [
                        "x".join(map(str, shape)),
                        dtype_name,
                        layout_name,
                        copy * 1e3,
                        unshuffle * 1e3,
                        reference * 1e3,
                        sliced * 1e3,
                        unshuffle / copy,
                        reference / copy,
                        sliced / best,
                        "yes" if best <= GOAL_OF_COPY * copy and best < sliced else "no",
                    ]
                )
                del x
    return rows


def check_exact(x: torch.Tensor) -> None:
    """Check that the reference order equals the slicing formulation bit for bit."""
    if not torch.equal(space_to_depth(x, (2, 2), order="reference"), slicing(x)):
        raise AssertionError(f"space_to_depth(order='reference') differs from slicing on {x.shape}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)

    headers = [
        "shape",
        "dtype",
        "layout",
        "copy ms",
        "spd unshuffle ms",
        "spd reference ms",
        "slicing ms",
        "unshuffle / copy",
        "reference / copy",
        "slicing / best spd",
        "goal met",
    ]
    rows = measure(args)
    emit("\n## SPD op: space_to_depth vs copy and slicing\n", args.markdown)
    emit("\n".join(f"- {line}" for line in machine_lines(args.device)) + "\n", args.markdown)
    emit(table(headers, rows), args.markdown)


if __name__ == "__main__":
    main()
