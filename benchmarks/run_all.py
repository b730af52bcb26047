"""Run every spd-rewrite benchmark in turn and print its tables.

    python benchmarks/run_all.py            # the full run, under 10 minutes on a 2-core CPU
    python benchmarks/run_all.py --quick    # a smoke test of every script, about 1 minute
    python benchmarks/run_all.py --device cuda --markdown results.md

Each script runs in its own Python process, so one benchmark's memory and thread settings do not
leak into the next. The scripts can also be run one by one; ``--help`` lists their options.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = ["bench_spd_op.py", "bench_rewrite.py", "bench_models.py"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="run each script's small subset")
    parser.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, ...)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--markdown", default=None, help="also append every table to this file")
    parser.add_argument(
        "--only", default=None, help="comma-separated script names to run (default: all)"
    )
    args = parser.parse_args(argv)

    options = ["--device", args.device]
    if args.quick:
        options.append("--quick")
    if args.threads is not None:
        options += ["--threads", str(args.threads)]
    if args.markdown:
        options += ["--markdown", str(Path(args.markdown).resolve())]

    scripts = args.only.split(",") if args.only else SCRIPTS
    folder = Path(__file__).resolve().parent
    failed = []
    start = time.perf_counter()
    for script in scripts:
        print(f"\n# {script}", flush=True)
        script_start = time.perf_counter()
        result = subprocess.run([sys.executable, str(folder / script), *options], cwd=folder)
        print(f"({script}: {time.perf_counter() - script_start:.0f} s)", flush=True)
        if result.returncode != 0:
            failed.append(script)
    print(f"\nall benchmarks: {time.perf_counter() - start:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
