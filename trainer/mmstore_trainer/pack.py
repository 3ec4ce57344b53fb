"""Packing: materialized samples into micro-batches of one row, up to a token budget.

A micro-batch is the samples' token ids concatenated (batch of one, no padding), their images'
tensors concatenated in image order, and position ids computed PER SAMPLE by the model's own
function (through the family) before concatenation, so every sample sees exactly the positions
it would see alone. The family's packed position form makes the model attend only within each
sample (for Qwen: the text-position row resets at each boundary; see
:mod:`mmstore_trainer.families.qwen_vl`). The packing test checks that a packed micro-batch's
logits equal each sample's logits run alone.

Trained positions: token ``j`` is a target when its loss mask is set and it is not the first
token of its sample (no logit of the same sample predicts it). Its logprob comes from the
logits at ``j - 1``, which is why :attr:`MicroBatch.logit_positions` is ``targets - 1``.

Bins are filled first-fit by decreasing length (good fill, deterministic); within a bin the
samples keep their input order. A sample longer than the budget gets a bin of its own: it is
never split (its attention would be cut) nor dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmstore_trainer.data import MaterializedSample
from mmstore_trainer.families import Family


@dataclass
class MicroBatch:
    """One packed forward pass."""

    input_ids: torch.Tensor  # (1, L)
    position_ids: torch.Tensor  # the family's packed form
    model_inputs: dict[str, torch.Tensor]  # image tensors (e.g. pixel_values, image_grid_thw)
    targets: torch.Tensor  # (K,) positions j trained on (loss mask set, not a sample start)
    advantages: torch.Tensor  # (K,) at the targets
    old_logprobs: torch.Tensor  # (K,) inference logprobs at the targets
    cu_seqlens: torch.Tensor  # (n + 1,) sample boundaries
    sample_ids: list[str]
    num_images: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def logit_positions(self) -> torch.Tensor:
        """Where the logits predicting the targets are: one position earlier."""
        return self.targets - 1

    def to(self, device: torch.device | str) -> MicroBatch:
        moved = {k: v.to(device, non_blocking=True) for k, v in self.model_inputs.items()}
        return MicroBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            moved,
            self.targets.to(device),
            self.advantages.to(device),
            self.old_logprobs.to(device),
            self.cu_seqlens.to(device),
            list(self.sample_ids),
            self.num_images,
        )

    def forward_kwargs(self, family: Family) -> dict[str, Any]:
        return family.forward_kwargs(self.input_ids, self.position_ids, self.model_inputs)


def plan(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``token_budget`` tokens (first-fit
    decreasing; an over-long item alone); bins in order of their first item, items in order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(token_budget - lengths[i])
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def pack_one(samples: Sequence[MaterializedSample], family: Family, model: Any) -> MicroBatch:
    """Concatenate ``samples`` into one micro-batch (positions per sample, by the model)."""
    positions, targets, starts = [], [], [0]
    for s in samples:
        positions.append(family.position_ids(model, s.token_ids, s.grids))
        is_target = s.loss_mask.clone()
        is_target[0] = False  # nothing in this sample predicts its first token
        targets.append(torch.nonzero(is_target).flatten() + starts[-1])
        starts.append(starts[-1] + len(s))
    target_idx = torch.cat(targets)
    return MicroBatch(
        input_ids=torch.cat([s.token_ids for s in samples]).view(1, -1),
        position_ids=family.pack_position_ids(positions),
        model_inputs=family.model_inputs([im for s in samples for im in s.images]),
        targets=target_idx,
        advantages=torch.cat([s.advantages for s in samples])[target_idx],
        old_logprobs=torch.cat([s.logprobs for s in samples])[target_idx],
        cu_seqlens=torch.tensor(starts, dtype=torch.int32),
        sample_ids=[s.sample_id for s in samples],
        num_images=sum(len(s.images) for s in samples),
    )


def pack(
    samples: Sequence[MaterializedSample], family: Family, model: Any, token_budget: int
) -> list[MicroBatch]:
    """Micro-batches of at most ``token_budget`` tokens each (over-long samples alone)."""
    return [
        pack_one([samples[i] for i in b], family, model)
        for b in plan([len(s) for s in samples], token_budget)
    ]
