"""The training loop: loader ahead of the step, packed micro-batches, clipped PG loss, AdamW.

:func:`train` is the Python API (the smoke loop calls it; the CLI wraps it). :class:`Trainer`
exposes the pieces (one :meth:`Trainer.step` on materialized samples) for benchmarks and tests
that bring their own model. The data comes from :class:`~mmstore_trainer.dataset.StepDataset`
(this rank's share of each global step, materialized ahead and packed).

One process, or one rank of several under ``torchrun`` (FSDP2, :mod:`.distributed`): the same
loop. Precision: float32 on CPU; on GPU float32 weights under bf16 autocast (logprobs and the
loss are computed in float32 either way). Gradients of all micro-batches of a step accumulate
(and are summed across ranks), then one clipped AdamW update.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mmstore_client import StoreClient
from mmstore_client.placeholders import image_markup_ids

from mmstore_trainer.attention import use_varlen, varlen_available
from mmstore_trainer.checkpoint import save_checkpoint
from mmstore_trainer.config import Parallelism, TrainConfig
from mmstore_trainer.data import MaterializedSample, Materializer
from mmstore_trainer.dataset import RankStep, StepDataset
from mmstore_trainer.distributed import Ranks, launched_by_torchrun
from mmstore_trainer.loss import PgStats, clipped_pg_loss, token_logprobs
from mmstore_trainer.metrics import MetricsWriter, StepMetrics
from mmstore_trainer.pack import MicroBatch, pack
from mmstore_trainer.progress import RunProgress


@dataclass
class TrainReport:
    """What a run did: its per-step metrics, where they and the last checkpoint are."""

    steps: int
    metrics: list[StepMetrics]
    metrics_path: Path
    checkpoint: Path | None
    device: str
    rank: int = 0
    world_size: int = 1
    wait_s: float = 0.0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def first_loss(self) -> float:
        return self.metrics[0].loss

    @property
    def last_loss(self) -> float:
        return self.metrics[-1].loss


# Devices with torch's fused AdamW kernel (elsewhere the optimizer falls back to foreach).
FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """One training run, or this rank's part of one (``config.parallelism``).

    ``model`` and ``processor`` default to loading ``config.model`` (weights in float32, moved to
    ``config.device``); a model passed in is used as it is, on its own device and dtype
    (benchmarks build random-weight models that way), sharded first under FSDP. ``store``
    defaults to a client of ``config.store``, closed with the trainer.
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
        fsdp = config.parallelism is Parallelism.FSDP or (
            config.parallelism is Parallelism.AUTO and launched_by_torchrun()
        )
        self.ranks = Ranks.join(config.device, config.collective_timeout_s) if fsdp else None
        if processor is None:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(str(config.model))
        if model is None:
            from transformers import AutoModelForImageTextToText

            kwargs = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
            model = AutoModelForImageTextToText.from_pretrained(
                str(config.model), dtype=torch.float32, **kwargs
            )
            model.to(self.ranks.device if self.ranks else resolve_device(config.device))
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
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
        if config.varlen_vision_attention and varlen_available(next(model.parameters()).device):
            use_varlen(self.family.varlen_attention_configs(model))
        if self.ranks is not None:
            model = self.ranks.shard(model, self.family.shard_units(model))
        self.model = model
        self.device = next(model.parameters()).device
        self.processor = processor
        self.banned_ids = (
            torch.tensor(sorted(image_markup_ids(processor.tokenizer, self.materializer.layout)))
            if config.mask_image_tokens
            else None
        )
        # Fused: one kernel over every parameter (the default, foreach, makes a dozen list ops a
        # step). Under FSDP the optimizer holds this rank's shards as plain tensors (see
        # :mod:`.distributed`), whose gradients are set from the DTensors' before each step.
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shards = [Ranks.local(p) for p in self.params] if self.ranks is not None else self.params
        self.optimizer = torch.optim.AdamW(
            self.shards,
            lr=config.lr,
            weight_decay=config.weight_decay,
            fused=self.device.type in FUSED_OPTIMIZER_DEVICES,
        )
        self.step_count = 0
        self.rank_metrics: StepMetrics | None = None  # this rank's part of the last step

    @property
    def rank(self) -> int:
        return self.ranks.rank if self.ranks else 0

    @property
    def world_size(self) -> int:
        return self.ranks.world_size if self.ranks else 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _micro_loss(self, mb: MicroBatch, normalizer: int, weight: float = 1.0) -> PgStats:
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
        (loss * weight).backward()
        return stats

    def _accumulate(self, micro: list[MicroBatch]) -> PgStats:
        """Backward over every micro-batch, each loss divided by the step's trained tokens (over
        all ranks). Under FSDP every rank runs as many passes as the busiest one (the extra
        ones repeat a micro-batch with weight 0) and all-masked micro-batches run too: the ranks'
        collectives must pair up. One process skips what carries no gradient."""
        local = sum(int(mb.targets.numel()) for mb in micro)
        stats = PgStats()
        if self.ranks is None:
            for mb in micro:
                if mb.targets.numel():  # all-masked micro-batches (placeholders) carry no gradient
                    stats = stats.add(self._micro_loss(mb, local))
            return stats
        normalizer = self.ranks.sum_int(local)
        passes = self.ranks.max_int(len(micro))
        undo_average = float(self.world_size)  # FSDP averages gradients over ranks; we want the sum
        for i in range(passes):
            if i < len(micro):
                stats = stats.add(self._micro_loss(micro[i], normalizer, weight=undo_average))
            else:
                self._micro_loss(micro[0], normalizer, weight=0.0)
        return stats

    def _clip_and_step(self) -> float:
        """Clip the gradients to ``max_grad_norm`` (over all ranks), one AdamW step; the norm."""
        pairs = [(s, p.grad) for s, p in zip(self.shards, self.params, strict=True) if p.grad is not None]
        grad_norm = 0.0
        if pairs:
            if self.ranks is not None:
                for shard, grad in pairs:
                    shard.grad = Ranks.local(grad)
            shards = [shard for shard, _ in pairs]
            norm = torch.nn.utils.get_total_norm([shard.grad for shard in shards])
            if self.ranks is not None:
                norm = self.ranks.global_norm(norm)
            if self.config.max_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(shards, self.config.max_grad_norm, norm)
            grad_norm = float(norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ranks is not None:
            self.model.zero_grad(set_to_none=True)  # the DTensor gradients the shards' were views of
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return grad_norm

    def step(
        self,
        batch: list[MaterializedSample],
        *,
        wait_s: float = 0.0,
        started: float | None = None,
        micro: list[MicroBatch] | None = None,
    ) -> StepMetrics:
        """One optimizer step on ``batch`` (this rank's share, already materialized and verified;
        ``micro``: already packed). Returns the whole step's metrics (every rank's);
        :attr:`rank_metrics` keeps this rank's."""
        started = time.perf_counter() if started is None else started
        self.model.train()
        if micro is None:
            micro = pack(batch, self.family, self.model, self.config.token_budget)
        stats = self._accumulate(micro)
        grad_norm = self._clip_and_step()
        self.step_count += 1
        local = StepMetrics(
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
        self.rank_metrics = local
        return local if self.ranks is None else self.ranks.step_metrics(local, stats)

    def save(self, path: Path | None = None) -> Path:
        """A complete checkpoint of the current weights (default ``out/checkpoints/step-N``).

        Under FSDP every rank must call it (the full state dict is gathered); rank 0 writes it."""
        path = path or self.config.out / "checkpoints" / f"step-{self.step_count:06d}"
        state = {
            "step": self.step_count,
            "world_size": self.world_size,
            "config": self.config.model_dump(mode="json"),
        }
        if self.ranks is None:
            return save_checkpoint(self.model, self.config.model, path, state=state)
        weights = self.ranks.full_state_dict(self.model)
        if self.ranks.is_main:
            save_checkpoint(self.model, self.config.model, path, state=state, state_dict=weights)
        return path

    def dataset(self, **kwargs: Any) -> StepDataset:
        """This rank's :class:`StepDataset` of the configured data."""
        cfg = self.config
        return StepDataset(
            cfg.data,
            self.materializer,
            model=self.model,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            token_budget=cfg.token_budget,
            rank=self.rank,
            world_size=self.world_size,
            seed=cfg.seed,
            workers=cfg.workers,
            prefetch=cfg.prefetch,
            max_sample_tokens=cfg.max_sample_tokens,
            truncation=cfg.truncation,
            **kwargs,
        )

    def run(self) -> TrainReport:
        """``config.steps`` steps over the data, loader ahead; metrics and checkpoints to ``out``.

        Rank 0 writes ``metrics.jsonl`` (the whole step's figures) and the checkpoints; under
        FSDP each rank also writes ``metrics.rank-N.jsonl`` (its own share, its sample ids and
        its store client's blob fetches so far)."""
        cfg = self.config
        main = self.rank == 0
        writer = MetricsWriter(cfg.out / "metrics.jsonl") if main else None
        rank_writer = MetricsWriter(cfg.out / f"metrics.rank-{self.rank}.jsonl") if self.ranks else None
        history: list[StepMetrics] = []
        checkpoint: Path | None = None
        t_run = time.perf_counter()
        total = cfg.steps * cfg.batch_size if self.world_size == 1 else None
        try:
            with RunProgress(total, cfg.steps, enabled=cfg.progress and main) as progress:
                dataset = self.dataset(on_loaded=progress.loaded)
                with contextlib.closing(iter(dataset)) as steps:
                    for _ in range(cfg.steps):
                        started = time.perf_counter()
                        part = next(steps)
                        metrics = self.step(
                            part.samples, wait_s=part.wait_s, started=started, micro=part.micro_batches
                        )
                        history.append(metrics)
                        if rank_writer is not None and self.rank_metrics is not None:
                            rank_writer.write(self.rank_metrics, extra=self._rank_record(part))
                        if writer is not None:
                            writer.write(metrics)
                        progress.stepped(metrics)
                        if cfg.save_every and self.step_count % cfg.save_every == 0:
                            checkpoint = self.save()
            if cfg.save_final and (
                checkpoint is None or not checkpoint.name.endswith(f"{self.step_count:06d}")
            ):
                checkpoint = self.save()
        finally:
            for w in (writer, rank_writer):
                if w is not None:
                    w.close()
        return TrainReport(
            steps=self.step_count,
            metrics=history,
            metrics_path=cfg.out / "metrics.jsonl",
            checkpoint=checkpoint,
            device=str(self.device),
            rank=self.rank,
            world_size=self.world_size,
            wait_s=sum(m.wait_s for m in history),
            wall_s=time.perf_counter() - t_run,
            extra=dict(dataset.counts),
        )

    def _rank_record(self, part: RankStep) -> dict[str, Any]:
        ids = [s.sample_id for s in part.samples]
        return {"rank": self.rank, "sample_ids": ids, "store_fetches": self.store.fetches}

    def close(self) -> None:
        if self._own_store:
            self.store.close()
        if self.ranks is not None:
            self.ranks.leave()

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
