"""The training loop: loader ahead of the step, packed micro-batches, clipped PG loss, AdamW.

:func:`train` is the Python API (the smoke loop calls it; the CLI wraps it). :class:`Trainer`
exposes the pieces (one :meth:`Trainer.step` on materialized samples) for benchmarks and tests
that bring their own model.

Precision: float32 on CPU; on GPU float32 weights under bf16 autocast (logprobs and the loss
are computed in float32 either way). Gradients of all micro-batches of a step accumulate, then
one clipped AdamW update.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mmstore_client import StoreClient
from mmstore_client.descriptor import Sample
from mmstore_client.placeholders import image_markup_ids
from mmstore_client.truncate import truncate_sample

from mmstore_trainer.checkpoint import save_checkpoint
from mmstore_trainer.config import TrainConfig
from mmstore_trainer.data import MaterializedSample, Materializer
from mmstore_trainer.loader import Loader
from mmstore_trainer.loss import PgStats, clipped_pg_loss, token_logprobs
from mmstore_trainer.metrics import MetricsWriter, StepMetrics
from mmstore_trainer.pack import MicroBatch, pack
from mmstore_trainer.progress import RunProgress
from mmstore_trainer.samples import SampleFileError, read_samples


def training_stream(cfg: TrainConfig, counts: dict[str, int]) -> Iterator[Sample]:
    """``steps * batch_size`` samples from the data (cycled), ``cfg.max_sample_tokens`` applied
    under ``cfg.truncation``; truncated and dropped samples are counted in ``counts``."""
    wanted, served = cfg.steps * cfg.batch_size, 0
    for sample in sample_stream(list(cfg.data), 2**62):
        if served == wanted:
            return
        if cfg.max_sample_tokens is not None and len(sample.token_ids) > cfg.max_sample_tokens:
            cut = truncate_sample(sample, cfg.max_sample_tokens, cfg.truncation)
            if cut is None:
                counts["dropped_samples"] += 1
                if served == 0 and counts["dropped_samples"] > 100_000:
                    raise SampleFileError(f"every sample is over max_sample_tokens={cfg.max_sample_tokens}")
                continue
            counts["truncated_samples"] += 1
            sample = cut
        served += 1
        yield sample


@dataclass
class TrainReport:
    """What a run did: its per-step metrics, where they and the last checkpoint are."""

    steps: int
    metrics: list[StepMetrics]
    metrics_path: Path
    checkpoint: Path | None
    device: str
    wait_s: float = 0.0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def first_loss(self) -> float:
        return self.metrics[0].loss

    @property
    def last_loss(self) -> float:
        return self.metrics[-1].loss


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sample_stream(paths: list[Path], count: int) -> Iterator[Sample]:
    """``count`` samples from ``paths`` in order, starting over at the end (epochs)."""
    served = 0
    while served < count:
        epoch = 0
        for path in paths:
            for sample in read_samples(path):
                yield sample
                served += 1
                epoch += 1
                if served == count:
                    return
        if epoch == 0:
            raise SampleFileError(f"no samples in {', '.join(map(str, paths))}")


class Trainer:
    """One training run.

    ``model`` and ``processor`` default to loading ``config.model`` (weights in float32, moved to
    ``config.device``); a model passed in is used as it is, on its own device and dtype
    (benchmarks build random-weight models that way). ``store`` defaults to a client of
    ``config.store``, closed with the trainer.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: Any | None = None,
        processor: Any | None = None,
        store: StoreClient | None = None,
    ) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        if processor is None:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(str(config.model))
        if model is None:
            from transformers import AutoModelForImageTextToText

            kwargs = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
            model = AutoModelForImageTextToText.from_pretrained(
                str(config.model), dtype=torch.float32, **kwargs
            )
            model.to(resolve_device(config.device))
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.model = model
        self.device = next(model.parameters()).device
        self.processor = processor
        self._own_store = store is None
        self.store = store if store is not None else StoreClient(config.store, token=config.store_token)
        self.materializer = Materializer.from_pretrained(
            config.model,
            self.store,
            missing_images=config.missing_images,
            processor=processor,
            strict_pixels=config.strict_pixels,
        )
        self.family = self.materializer.family
        self.banned_ids = (
            torch.tensor(sorted(image_markup_ids(processor.tokenizer, self.materializer.layout)))
            if config.mask_image_tokens
            else None
        )
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
        )
        self.step_count = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _micro_loss(self, mb: MicroBatch, normalizer: int) -> PgStats:
        mb = mb.to(self.device)
        with self.autocast():
            out = self.model(**mb.forward_kwargs(self.family), logits_to_keep=mb.logit_positions)
        logprobs = token_logprobs(
            out.logits[0], mb.input_ids[0, mb.targets], self.config.temperature, self.banned_ids
        )
        loss, stats = clipped_pg_loss(
            logprobs,
            mb.old_logprobs,
            mb.advantages,
            eps_low=self.config.clip_eps_low,
            eps_high=self.config.clip_eps_high,
            normalizer=normalizer,
        )
        loss.backward()
        return stats

    def step(
        self, batch: list[MaterializedSample], *, wait_s: float = 0.0, started: float | None = None
    ) -> StepMetrics:
        """One optimizer step on ``batch`` (already materialized and verified)."""
        started = time.perf_counter() if started is None else started
        self.model.train()
        micro = pack(batch, self.family, self.model, self.config.token_budget)
        normalizer = sum(int(mb.targets.numel()) for mb in micro)
        stats = PgStats()
        for mb in micro:
            if mb.targets.numel():  # all-masked micro-batches (placeholders) carry no gradient
                stats = stats.add(self._micro_loss(mb, normalizer))
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = 0.0
        if params:
            max_norm = self.config.max_grad_norm or math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step_count += 1
        return StepMetrics(
            step=self.step_count,
            **stats.summary(),
            grad_norm=grad_norm,
            lr=self.optimizer.param_groups[0]["lr"],
            samples=len(batch),
            tokens=sum(len(s) for s in batch),
            trained_tokens=stats.tokens,
            images=sum(len(s.images) for s in batch),
            micro_batches=len(micro),
            missing_images=sum(s.missing_images for s in batch),
            zero_loss_samples=sum(1 for s in batch if s.missing_images),
            pixels_checked=sum(s.pixels_checked for s in batch),
            pixel_mismatches=sum(s.pixel_mismatches for s in batch),
            fetched_bytes=sum(s.fetched_bytes for s in batch),
            fetch_s=sum(s.fetch_s for s in batch),
            preprocess_s=sum(s.preprocess_s for s in batch),
            wait_s=wait_s,
            step_s=time.perf_counter() - started,
        )

    def save(self, path: Path | None = None) -> Path:
        """A complete checkpoint of the current weights (default ``out/checkpoints/step-N``)."""
        path = path or self.config.out / "checkpoints" / f"step-{self.step_count:06d}"
        state = {"step": self.step_count, "config": self.config.model_dump(mode="json")}
        return save_checkpoint(self.model, self.config.model, path, state=state)

    def run(self) -> TrainReport:
        """``config.steps`` steps over the data, loader ahead; metrics and checkpoints to ``out``."""
        cfg = self.config
        total = cfg.steps * cfg.batch_size
        writer = MetricsWriter(cfg.out / "metrics.jsonl")
        history: list[StepMetrics] = []
        checkpoint: Path | None = None
        t_run = time.perf_counter()
        counts = {"truncated_samples": 0, "dropped_samples": 0}
        stream = training_stream(cfg, counts)
        try:
            with (
                RunProgress(total, cfg.steps, enabled=cfg.progress) as progress,
                Loader(
                    stream,
                    self.materializer,
                    workers=cfg.workers,
                    prefetch=cfg.prefetch,
                    on_done=progress.loaded,
                ) as loader,
            ):
                for _ in range(cfg.steps):
                    started = time.perf_counter()
                    batch, wait_s = loader.take(cfg.batch_size)
                    metrics = self.step(batch, wait_s=wait_s, started=started)
                    history.append(metrics)
                    writer.write(metrics)
                    progress.stepped(metrics)
                    if cfg.save_every and self.step_count % cfg.save_every == 0:
                        checkpoint = self.save()
            if cfg.save_final and (
                checkpoint is None or not checkpoint.name.endswith(f"{self.step_count:06d}")
            ):
                checkpoint = self.save()
        finally:
            writer.close()
        return TrainReport(
            steps=self.step_count,
            metrics=history,
            metrics_path=writer.path,
            checkpoint=checkpoint,
            device=str(self.device),
            wait_s=sum(m.wait_s for m in history),
            wall_s=time.perf_counter() - t_run,
            extra=dict(counts),
        )

    def close(self) -> None:
        if self._own_store:
            self.store.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def train(config: TrainConfig | dict[str, Any], **overrides: Any) -> TrainReport:
    """Run training as configured (a :class:`TrainConfig` or its fields) and return the report."""
    if not isinstance(config, TrainConfig):
        config = TrainConfig(**config)
    if overrides:
        config = config.model_copy(update=overrides)
        config = TrainConfig(**config.model_dump())
    with Trainer(config) as trainer:
        return trainer.run()
