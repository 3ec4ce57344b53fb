"""Sharding: which rank trains on which samples of a global step.

Every rank reads the same sample files in the same order and calls :func:`assign` with the same
arguments, so all ranks agree on the assignment without exchanging a byte; each rank then
materializes only its own share. The assignment:

1. groups the step's samples that share an image (same digest) into one unit (connected
   components over digests), so an image is fetched, decoded and processed by one rank;
2. keeps a unit whole only where that costs nothing in balance: a unit holding more tokens than
   a rank's fair share (the step's tokens / ranks) is split into its samples, as are the largest
   units while there are fewer units than ranks (every rank needs a sample: FSDP's collectives
   run on every rank);
3. places units largest first on the rank with the fewest tokens so far (longest-processing-time
   first: no rank ends more than one unit above the mean), ties broken by a seeded shuffle
   (``seed`` and the step), so the assignment is reproducible and not biased toward rank 0.

Within a rank, samples keep their order in the global batch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mmstore_client.samples import Sample


def _units(digests: Sequence[Sequence[str]]) -> list[list[int]]:
    """Indices grouped by shared digests (union-find), in order of first appearance."""
    parent = list(range(len(digests)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, ds in enumerate(digests):
        for d in ds:
            if d in owner:
                parent[root(i)] = root(owner[d])
            else:
                owner[d] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(digests)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def assign_indices(
    lengths: Sequence[int], digests: Sequence[Sequence[str]], world_size: int, *, seed: int, step: int
) -> list[list[int]]:
    """For each rank, the indices (in order) of the samples it trains on; see the module doc."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if len(lengths) < world_size:
        raise ValueError(
            f"a global batch of {len(lengths)} samples cannot give each of {world_size} ranks a sample; "
            f"raise --batch-size to at least {world_size}"
        )
    fair = sum(lengths) / world_size
    units: list[list[int]] = []
    for unit in _units(digests):
        whole = sum(lengths[i] for i in unit) <= fair
        units.extend([unit] if whole else [[i] for i in unit])
    while len(units) < world_size:
        largest = max((u for u in units if len(u) > 1), key=lambda u: sum(lengths[i] for i in u))
        units.remove(largest)
        units.extend([i] for i in largest)
    rng = random.Random(f"{seed}:{step}")
    tie = {id(u): rng.random() for u in units}
    units.sort(key=lambda u: (-sum(lengths[i] for i in u), tie[id(u)]))
    load = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for unit in units:
        rank = min(range(world_size), key=lambda r: (load[r], len(shares[r]), r))
        shares[rank].extend(unit)
        load[rank] += sum(lengths[i] for i in unit)
    return [sorted(s) for s in shares]


def assign(samples: Sequence[Sample], world_size: int, *, seed: int, step: int) -> list[list[Sample]]:
    """The samples of one global step, split among ``world_size`` ranks (see the module doc)."""
    shares = assign_indices(
        [len(s.token_ids) for s in samples],
        [[d.digest for d in s.descriptors] for s in samples],
        world_size,
        seed=seed,
        step=step,
    )
    return [[samples[i] for i in share] for share in shares]
