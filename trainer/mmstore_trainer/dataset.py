"""The data path as a library: sample files + a store -> this rank's model-ready micro-batches.

:class:`StepDataset` is a ``torch.utils.data.IterableDataset`` that any training loop can
consume (ours, a plain PyTorch or HF loop, another RL trainer's). For each global step it:

1. takes the next ``batch_size`` samples of the sample files (cycled; ``max_sample_tokens``
   applied), the same on every rank;
2. keeps this rank's share (:mod:`.sharding`: seeded, token-balanced, samples that share an
   image on one rank), so a rank fetches and processes only the images it trains on;
3. materializes the share ahead of the consumer in the loader's threads (:mod:`.loader`): fetch
   by digest, verify, decode, the checkpoint's image processor, every descriptor check
   (:mod:`.data`);
4. packs it into micro-batches (:mod:`.pack`) with the family's position ids (M-RoPE for Qwen)
   and yields one :class:`RankStep`.

Position ids come from the model's own function, which needs only the model's config: without a
``model``, the dataset builds the architecture on the ``meta`` device (no weights, no memory).

It prefetches in threads of its own: use it directly or with ``DataLoader(ds, batch_size=None)``
and no DataLoader worker processes (they would each read and fetch everything again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mmstore_client import StoreClient
from mmstore_client.samples import Sample, SampleFileError, read_samples
from mmstore_client.truncate import TruncationPolicy, truncate_sample
from torch.utils.data import IterableDataset, get_worker_info

from mmstore_trainer.config import MissingImagePolicy
from mmstore_trainer.data import MaterializedSample, Materializer
from mmstore_trainer.loader import Loader
from mmstore_trainer.pack import MicroBatch, pack
from mmstore_trainer.sharding import assign


def sample_stream(paths: Sequence[Path], count: int) -> Iterator[Sample]:
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


def training_stream(
    paths: Sequence[Path],
    count: int,
    counts: dict[str, int],
    *,
    max_sample_tokens: int | None = None,
    truncation: TruncationPolicy = TruncationPolicy.CUT,
) -> Iterator[Sample]:
    """``count`` samples from ``paths`` (cycled), ``max_sample_tokens`` applied under
    ``truncation``; truncated and dropped samples are counted in ``counts``."""
    served = 0
    for sample in sample_stream(list(paths), 2**62):
        if served == count:
            return
        if max_sample_tokens is not None and len(sample.token_ids) > max_sample_tokens:
            cut = truncate_sample(sample, max_sample_tokens, truncation)
            if cut is None:
                counts["dropped_samples"] = counts.get("dropped_samples", 0) + 1
                if served == 0 and counts["dropped_samples"] > 100_000:
                    raise SampleFileError(f"every sample is over max_sample_tokens={max_sample_tokens}")
                continue
            counts["truncated_samples"] = counts.get("truncated_samples", 0) + 1
            sample = cut
        served += 1
        yield sample


@dataclass
class RankStep:
    """This rank's part of one global step: its verified samples and their micro-batches."""

    step: int  # 1-based global step
    samples: list[MaterializedSample]
    micro_batches: list[MicroBatch]
    wait_s: float  # time the consumer spent blocked on the loader for this step

    @property
    def trained_tokens(self) -> int:
        """Tokens the loss is taken over on this rank (sum across ranks to normalize a loss)."""
        return sum(int(mb.targets.numel()) for mb in self.micro_batches)


@dataclass
class _Item:
    sample: Sample
    step: int
    last: bool  # the last sample of this rank's share of the step


def default_rank() -> tuple[int, int]:
    """(rank, world size) of the initialized process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def meta_model(model_dir: str | Path) -> Any:
    """The checkpoint's architecture without weights (on the ``meta`` device): enough for
    config-only functions such as the position ids."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


class StepDataset(IterableDataset):
    """Yields one :class:`RankStep` per global step for ``rank`` of ``world_size`` (default: the
    initialized process group's, else 0 of 1). See the module docstring."""

    def __init__(
        self,
        data: Sequence[str | Path],
        materializer: Materializer,
        *,
        model: Any,
        steps: int,
        batch_size: int,
        token_budget: int,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        workers: int = 2,
        prefetch: int = 8,
        max_sample_tokens: int | None = None,
        truncation: TruncationPolicy = TruncationPolicy.CUT,
        on_loaded: Callable[[MaterializedSample], None] | None = None,
    ) -> None:
        super().__init__()
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither (the process group's)")
        self.rank, self.world_size = (rank, world_size) if rank is not None else default_rank()
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size}")
        if batch_size < self.world_size:
            raise ValueError(
                f"--batch-size {batch_size} gives some of the {self.world_size} ranks no sample; "
                f"use a batch size of at least {self.world_size}"
            )
        self.data = [Path(p) for p in data]
        self.materializer = materializer
        self.family = materializer.family
        self.model = model
        self.steps, self.batch_size, self.token_budget = steps, batch_size, token_budget
        self.seed, self.workers, self.prefetch = seed, workers, prefetch
        self.max_sample_tokens, self.truncation = max_sample_tokens, truncation
        self.on_loaded = on_loaded
        self.counts = {"truncated_samples": 0, "dropped_samples": 0}

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        data: Sequence[str | Path],
        store: str | StoreClient,
        *,
        store_token: str | None = None,
        missing_images: MissingImagePolicy = MissingImagePolicy.ERROR,
        strict_pixels: bool = False,
        model: Any | None = None,
        **kwargs: Any,
    ) -> StepDataset:
        """Everything from the checkpoint folder (processor, layout, family) and a store URL."""
        client = store if isinstance(store, StoreClient) else StoreClient(store, token=store_token)
        materializer = Materializer.from_pretrained(
            model_dir, client, missing_images=missing_images, strict_pixels=strict_pixels
        )
        return cls(data, materializer, model=model if model is not None else meta_model(model_dir), **kwargs)

    def shares(self) -> Iterator[tuple[int, list[Sample]]]:
        """(global step, this rank's samples of it), reading the sample files (no image fetched)."""
        stream = training_stream(
            self.data,
            self.steps * self.batch_size,
            self.counts,
            max_sample_tokens=self.max_sample_tokens,
            truncation=self.truncation,
        )
        for step in range(1, self.steps + 1):
            batch = [s for _, s in zip(range(self.batch_size), stream, strict=False)]
            if len(batch) < self.world_size:
                return
            yield step, assign(batch, self.world_size, seed=self.seed, step=step)[self.rank]

    def _items(self) -> Iterator[_Item]:
        for step, share in self.shares():
            for i, sample in enumerate(share):
                yield _Item(sample, step, i == len(share) - 1)

    def _materialize(self, item: _Item) -> tuple[MaterializedSample, _Item]:
        return self.materializer(item.sample), item

    def __iter__(self) -> Iterator[RankStep]:
        if get_worker_info() is not None:
            raise RuntimeError(
                "StepDataset prefetches in its own threads: use DataLoader(dataset, batch_size=None) "
                "with num_workers=0, or iterate the dataset directly"
            )
        on_done = None if self.on_loaded is None else (lambda r: self.on_loaded(r[0]))
        loader = Loader(
            self._items(), self._materialize, workers=self.workers, prefetch=self.prefetch, on_done=on_done
        )
        with loader:
            samples: list[MaterializedSample] = []
            before = loader.stats.wait_s
            for materialized, item in loader:
                samples.append(materialized)
                if item.last:
                    wait_s = loader.stats.wait_s - before
                    micro = pack(samples, self.family, self.model, self.token_budget)
                    yield RankStep(item.step, samples, micro, wait_s)
                    samples, before = [], loader.stats.wait_s
