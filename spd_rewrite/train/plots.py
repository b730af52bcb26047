"""PNG plots: training curves from a metrics JSONL file, and accuracy against input resolution."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["plot_accuracy_vs_resolution", "plot_training_curves"]


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    # Agg renders to files without a display; set before pyplot is first imported.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(metrics_path: Path, output: Path) -> Path:
    """Plot every numeric metric of a ``metrics.jsonl`` file against the epoch, one panel each.

    Raises:
        ValueError: the file contains no records.
    """
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"no metrics records found in {metrics_path}")
    names = sorted(
        {
            key
            for record in records
            for key, value in record.items()
            if key not in ("epoch", "seconds") and isinstance(value, int | float)
        }
    )
    plt = _pyplot()
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names, strict=False):
        points = [(r["epoch"], r[name]) for r in records if isinstance(r.get(name), int | float)]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(names) :]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def plot_accuracy_vs_resolution(
    results: Mapping[str, Mapping[int, Sequence[float]]],
    output: Path,
    *,
    metric: str = "validation accuracy",
) -> Path:
    """Plot, per model, the mean and min-max range over seeds of a metric at each input size.

    Args:
        results: model name -> input size in pixels -> one value per seed.
        output: the PNG file to write.
        metric: the y-axis label.
    """
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for name, by_size in results.items():
        sizes = sorted(by_size)
        means = [statistics.fmean(by_size[s]) for s in sizes]
        lows = [min(by_size[s]) for s in sizes]
        highs = [max(by_size[s]) for s in sizes]
        axis.plot(sizes, means, marker="o", label=name)
        axis.fill_between(sizes, lows, highs, alpha=0.2)
    axis.set_xlabel("input size (pixels)")
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output
