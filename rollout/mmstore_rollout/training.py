"""The loop's training step: the trainer on the samples the rollouts wrote, and what the summary
keeps of its report (the trainer's invariants summed over its steps)."""

from __future__ import annotations

from pathlib import Path


def train_on_samples(
    model: Path,
    samples_file: Path,
    store_url: str,
    out: Path,
    *,
    steps: int,
    batch_size: int,
    temperature: float,
) -> dict:
    """Train ``steps`` steps on ``samples_file`` (images fetched from ``store_url``), checkpoint
    into ``out``; return the report's figures: per step, and the sums the summary checks (every
    image found, every pixel the one inference saw)."""
    from mmstore_trainer.config import TrainConfig
    from mmstore_trainer.train import train

    report = train(
        TrainConfig(
            model=model,
            data=[samples_file],
            out=out,
            store=store_url,
            steps=steps,
            batch_size=batch_size,
            lr=1e-3,
            temperature=temperature,
            workers=2,
            progress=True,
        )
    )
    per_step = [m.to_dict() for m in report.metrics]
    return {
        **report.extra,
        "steps": per_step,
        "checkpoint": str(report.checkpoint or ""),
        "device": report.device,
        "missing_images": sum(m["missing_images"] for m in per_step),
        "pixels_checked": sum(m["pixels_checked"] for m in per_step),
        "pixel_mismatches": sum(m["pixel_mismatches"] for m in per_step),
        "images": sum(m["images"] for m in per_step),
        "fetched_bytes": sum(m["fetched_bytes"] for m in per_step),
        "loader_wait_s": round(report.wait_s, 3),
        "wall_s": round(report.wall_s, 3),
    }
