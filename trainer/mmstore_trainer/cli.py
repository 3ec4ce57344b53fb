"""mmstore-trainer: train on sample files whose images live in mmstore; build tiny models.

Every ``train`` option also reads ``MMSTORE_TRAINER_<OPTION>`` (e.g. ``MMSTORE_TRAINER_LR``);
flags win over the environment, which wins over the defaults of :class:`TrainConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from mmstore_client.truncate import TruncationPolicy

from mmstore_trainer.config import MissingImagePolicy, Parallelism, TrainConfig
from mmstore_trainer.tiny_model import TINY_FAMILY

app = typer.Typer(help=__doc__.split("\n\n")[0], no_args_is_help=True, add_completion=False)
_FIELDS = TrainConfig.model_fields
ENV = "MMSTORE_TRAINER_"


def _opt(flag: str, help: str | None = None, **kwargs) -> typer.models.OptionInfo:
    """``--flag``, read from ``MMSTORE_TRAINER_FLAG`` too, with the config field's description."""
    name = flag.split("/")[0].replace("-", "_")
    return typer.Option(
        f"--{flag}", envvar=ENV + name.upper(), help=help or _FIELDS[name].description, **kwargs
    )


def _default(name: str):
    """The config's default, so the CLI and the Python API cannot drift apart."""
    return _FIELDS[name].default


@app.command()
def train(
    model: Annotated[Path, _opt("model", exists=True, file_okay=False)],
    data: Annotated[
        list[Path], _opt("data", "sample file (.jsonl or .parquet); repeat for several", exists=True)
    ],
    out: Annotated[Path, _opt("out")],
    store: Annotated[str, _opt("store")] = _default("store"),
    store_token: Annotated[str | None, _opt("store-token")] = _default("store_token"),
    steps: Annotated[int, _opt("steps", min=1)] = _default("steps"),
    batch_size: Annotated[int, _opt("batch-size", min=1)] = _default("batch_size"),
    token_budget: Annotated[int, _opt("token-budget", min=1)] = _default("token_budget"),
    lr: Annotated[float, _opt("lr")] = _default("lr"),
    weight_decay: Annotated[float, _opt("weight-decay")] = _default("weight_decay"),
    max_grad_norm: Annotated[float, _opt("max-grad-norm", "gradient clipping; 0: off")] = 1.0,
    clip_eps_low: Annotated[float, _opt("clip-eps-low")] = _default("clip_eps_low"),
    clip_eps_high: Annotated[float, _opt("clip-eps-high")] = _default("clip_eps_high"),
    temperature: Annotated[float, _opt("temperature")] = _default("temperature"),
    mask_image_tokens: Annotated[bool, _opt("mask-image-tokens/--no-mask-image-tokens")] = _default(
        "mask_image_tokens"
    ),
    strict_pixels: Annotated[bool, _opt("strict-pixels/--no-strict-pixels")] = _default("strict_pixels"),
    max_sample_tokens: Annotated[int | None, _opt("max-sample-tokens", min=1)] = _default(
        "max_sample_tokens"
    ),
    truncation: Annotated[TruncationPolicy, _opt("truncation")] = _default("truncation"),
    workers: Annotated[int, _opt("workers", min=0)] = _default("workers"),
    prefetch: Annotated[int, _opt("prefetch", min=1)] = _default("prefetch"),
    missing_images: Annotated[
        MissingImagePolicy, _opt("missing-images", MissingImagePolicy.__doc__.split("\n\n")[0])
    ] = _default("missing_images"),
    device: Annotated[str, _opt("device")] = _default("device"),
    attn_implementation: Annotated[str | None, _opt("attn-implementation")] = _default("attn_implementation"),
    varlen_vision_attention: Annotated[
        bool, _opt("varlen-vision-attention/--no-varlen-vision-attention")
    ] = _default("varlen_vision_attention"),
    seed: Annotated[int, _opt("seed")] = _default("seed"),
    save_every: Annotated[int, _opt("save-every", min=0)] = _default("save_every"),
    gradient_checkpointing: Annotated[bool, _opt("gradient-checkpointing")] = _default(
        "gradient_checkpointing"
    ),
    progress: Annotated[bool, _opt("progress/--no-progress")] = _default("progress"),
    parallelism: Annotated[
        Parallelism, _opt("parallelism", "auto: FSDP2 under torchrun; off: one process; fsdp: FSDP2 always")
    ] = _default("parallelism"),
    collective_timeout_s: Annotated[float, _opt("collective-timeout-s", min=1)] = _default(
        "collective_timeout_s"
    ),
) -> None:
    """Train: fetch and verify each sample's images from the store, pack, clipped PG steps.

    Writes OUT/metrics.jsonl (one line a step) and OUT/checkpoints/step-N (complete model folders).
    Under ``torchrun --nproc-per-node N`` each process is a rank of one FSDP2 run.
    """
    from mmstore_trainer.data import MaterializationError
    from mmstore_trainer.train import train as run_training

    config = TrainConfig(
        model=model,
        data=data,
        out=out,
        store=store,
        store_token=store_token,
        steps=steps,
        batch_size=batch_size,
        token_budget=token_budget,
        lr=lr,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm or None,
        clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high,
        temperature=temperature,
        mask_image_tokens=mask_image_tokens,
        strict_pixels=strict_pixels,
        max_sample_tokens=max_sample_tokens,
        truncation=truncation,
        workers=workers,
        prefetch=prefetch,
        missing_images=missing_images,
        device=device,
        attn_implementation=attn_implementation,
        varlen_vision_attention=varlen_vision_attention,
        seed=seed,
        save_every=save_every,
        gradient_checkpointing=gradient_checkpointing,
        progress=progress,
        parallelism=parallelism,
        collective_timeout_s=collective_timeout_s,
    )
    try:
        report = run_training(config)
    except MaterializationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if report.rank != 0:
        return
    typer.echo(
        f"trained {report.steps} steps on {report.device}"
        + (f" x {report.world_size} ranks" if report.world_size > 1 else "")
        + f" in {report.wall_s:.1f}s "
        f"(loader wait {report.wait_s:.1f}s); metrics: {report.metrics_path}; checkpoint: {report.checkpoint}"
    )


@app.command("make-tiny-model")
def make_tiny_model(
    path: Annotated[Path, typer.Argument(help="folder to create (kept if it already holds a model)")],
    family: Annotated[str, typer.Option(help="qwen2_vl or qwen3_vl")] = TINY_FAMILY,
    size: Annotated[
        str, typer.Option(help="tiny, or 2b: Qwen2-VL-2B's shapes, bf16, ~4.4 GB (qwen2_vl only; for a GPU)")
    ] = "tiny",
) -> None:
    """Build a random-weight checkpoint (tiny: tests, smoke runs) unless PATH already holds one."""
    from mmstore_trainer.tiny_model import ensure_tiny_model

    try:
        typer.echo(str(ensure_tiny_model(path, family, size)))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


if __name__ == "__main__":
    app()
