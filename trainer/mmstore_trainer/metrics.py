"""Per-step metrics: one record a step, appended to ``metrics.jsonl`` and printed as one line.

Times: ``fetch_s`` and ``preprocess_s`` are summed over the step's samples as the loader's
workers spent them (in the background, overlapping earlier steps); ``wait_s`` is what the step
itself spent blocked on the loader, and ``step_s`` the step's wall time including that wait.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO


@dataclass
class StepMetrics:
    step: int
    loss: float
    ratio_mean: float
    ratio_min: float
    ratio_max: float
    clip_frac: float
    grad_norm: float
    lr: float
    samples: int
    tokens: int  # tokens forwarded (all of the step's samples)
    trained_tokens: int  # tokens the loss was taken over
    images: int
    micro_batches: int
    missing_images: int
    zero_loss_samples: int  # samples whose loss mask was zeroed (placeholder images)
    pixels_checked: int  # images whose decoded pixels were compared with what inference saw
    pixel_mismatches: int  # ... and differed
    fetched_bytes: int
    fetch_s: float
    preprocess_s: float
    wait_s: float
    step_s: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"step {self.step:>4}  loss {self.loss:+.4f}  ratio {self.ratio_mean:.3f} "
            f"[{self.ratio_min:.3f}, {self.ratio_max:.3f}]  clip {self.clip_frac:.3f}  "
            f"gnorm {self.grad_norm:.3f}  tok {self.trained_tokens}/{self.tokens}  img {self.images}  "
            f"missing {self.missing_images}  pixels {self.pixels_checked - self.pixel_mismatches}/"
            f"{self.pixels_checked}  wait {self.wait_s:.2f}s  step {self.step_s:.2f}s"
        )


class MetricsWriter:
    """Writes one JSON object a line to ``path`` (a new file per run), flushed after each step."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f: IO[str] = path.open("w", encoding="utf-8")

    def write(self, metrics: StepMetrics, extra: dict | None = None) -> None:
        self._f.write(json.dumps({**metrics.to_dict(), **(extra or {})}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict[str, float | int]]:
    """The records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
