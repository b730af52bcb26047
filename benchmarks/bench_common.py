"""Helpers shared by the ``bench_*.py`` scripts: command-line options, the machine, tables."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
from collections.abc import Sequence

import torch


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--device``, ``--threads``, ``--quick`` and ``--markdown`` to a script's parser."""
    parser.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, ...)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's own choice, one per core)",
    )
    parser.add_argument("--quick", action="store_true", help="run a small subset, for a smoke test")
    parser.add_argument("--markdown", default=None, help="also append the tables to this file")


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count when the caller gave one."""
    if threads is not None:
        torch.set_num_threads(threads)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that wall-clock timers see it (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def machine_lines(device: str) -> list[str]:
    """Describe the machine, torch and the load average, one fact per line."""
    lines = [
        f"CPU: {_cpu_model()}, {os.cpu_count()} logical cores visible, "
        f"torch threads {torch.get_num_threads()}",
        f"torch {torch.__version__}, Python {platform.python_version()}, device {device}",
    ]
    if torch.device(device).type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(torch.device(device))}")
    load = os.getloadavg()
    lines.append(f"load average (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    return lines


def _cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Format rows as a Markdown table (readable as plain text too)."""
    cells = [[str(h) for h in headers], *[[_cell(value) for value in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def emit(text: str, markdown: str | None) -> None:
    """Print ``text`` and append it to the Markdown file when one was named."""
    print(text, flush=True)
    if markdown:
        with open(markdown, "a", encoding="utf-8") as file:
            file.write(text + "\n")


def milliseconds(seconds: float | None) -> float | None:
    """Convert seconds to milliseconds, keeping ``None``."""
    return None if seconds is None else seconds * 1000.0
