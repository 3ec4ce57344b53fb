"""The run's progress display: samples, images and bytes loaded; steps trained; a line per step.

The loader's workers report each materialized sample from their own threads (rich's
``Progress`` is thread-safe); the training loop reports each step. Disabled, it prints nothing.
"""

from __future__ import annotations

import threading

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmstore_trainer.data import MaterializedSample
from mmstore_trainer.metrics import StepMetrics


class RunProgress:
    """Context manager; :meth:`loaded` is safe to call from loader threads."""

    def __init__(self, total_samples: int | None, total_steps: int, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self.images = 0
        self.bytes = 0
        self._progress = Progress(
            TextColumn("{task.description:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self._load = self._progress.add_task("samples", total=total_samples, detail="")
        self._train = self._progress.add_task("steps", total=total_steps, detail="")

    def __enter__(self) -> RunProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def loaded(self, sample: MaterializedSample) -> None:
        with self._lock:
            self.images += len(sample.images)
            self.bytes += sample.fetched_bytes
            detail = f"images {self.images}  {self.bytes / 1e6:.1f} MB"
        self._progress.update(self._load, advance=1, detail=detail)

    def stepped(self, metrics: StepMetrics) -> None:
        self._progress.update(self._train, advance=1, detail=f"loss {metrics.loss:+.4f}")
        if self.enabled:
            self._progress.console.print(metrics.line(), highlight=False)
