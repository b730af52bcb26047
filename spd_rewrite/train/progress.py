"""Rich progress bars for training epochs, shown only on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["EpochProgress", "epoch_progress"]


class EpochProgress:
    """One bar per epoch; ``start_epoch`` returns the callback that advances it by one batch."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress

    def start_epoch(self, epoch: int, epochs: int, batches: int) -> Callable[[float], None]:
        progress = self._progress
        if progress is None:
            return lambda loss: None
        task = progress.add_task(f"epoch {epoch + 1}/{epochs}", total=batches, loss=float("nan"))

        def advance(loss: float) -> None:
            progress.update(task, advance=1, loss=loss)

        return advance


@contextmanager
def epoch_progress(enabled: bool) -> Iterator[EpochProgress]:
    """Yield progress bars on stderr, or silent ones when disabled or stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield EpochProgress(None)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        yield EpochProgress(progress)
