"""check_runs: its fast path (runs found with list.index, compared as slices) agrees with the
definition (every maximal run of the image token, matched to the descriptors in count and length)
on valid ids and on every kind of mismatch."""

from __future__ import annotations

import random

import pytest
from mmstore_client.descriptor import Descriptor
from mmstore_client.placeholders import PlaceholderMismatch, check_runs, image_runs

IMG = 3


def desc(n: int) -> Descriptor:
    return Descriptor(
        digest="blake3:" + "0" * 64,
        mime="image/png",
        width=28,
        height=28,
        family="qwen2_vl",
        layout={},
        fingerprint="f",
        grid=(1, 2, 2),
        num_tokens=n,
    )


def ids_for(lengths: list[int], rnd: random.Random) -> list[int]:
    out = [rnd.choice([5, 6, 7]) for _ in range(rnd.randint(0, 3))]
    for n in lengths:
        out += [IMG] * n + [rnd.choice([5, 6, 7]) for _ in range(rnd.randint(1, 3))]
    return out


def by_definition(ids: list[int], descriptors: list[Descriptor]):
    runs = image_runs(ids, IMG)
    ok = len(runs) == len(descriptors) and all(
        r.length == d.num_tokens for r, d in zip(runs, descriptors, strict=True)
    )
    return runs if ok else None


def cases():
    rnd = random.Random(0)
    for _ in range(300):
        lengths = [rnd.randint(1, 12) for _ in range(rnd.randint(0, 5))]
        descriptors = [desc(n) for n in lengths]
        ids = ids_for(lengths, rnd)
        yield "valid", ids, descriptors
        if lengths:
            k = rnd.randrange(len(lengths))
            longer = [*lengths[:k], lengths[k] + 1, *lengths[k + 1 :]]
            yield "one run too long", ids_for(longer, rnd), descriptors
            if lengths[k] > 1:
                shorter = [*lengths[:k], lengths[k] - 1, *lengths[k + 1 :]]
                yield "one run too short", ids_for(shorter, rnd), descriptors
            yield "a run missing", ids_for(lengths[:k] + lengths[k + 1 :], rnd), descriptors
            merged = [IMG if t != IMG and i > 0 and ids[i - 1] == IMG else t for i, t in enumerate(ids)]
            yield "runs merged", merged, descriptors
        if len(lengths) > 1:  # two images with nothing between them: one run of both lengths
            yield "adjacent runs", [5, *([IMG] * (lengths[0] + lengths[1])), 5], descriptors[:2]
        yield "a stray image token", [*ids, IMG], descriptors
        yield "ids end in a run", [*ids, *([IMG] * 4)], [*descriptors, desc(4)]


def test_check_runs_agrees_with_the_definition():
    seen = set()
    for kind, ids, descriptors in cases():
        expected = by_definition(ids, descriptors)
        seen.add((kind, expected is None))
        if expected is None:
            with pytest.raises(PlaceholderMismatch):
                check_runs(ids, descriptors, IMG)
        else:
            assert check_runs(ids, descriptors, IMG) == expected, kind
            assert check_runs(tuple(ids), descriptors, IMG) == expected, kind
    assert ("valid", False) in seen and ("one run too long", True) in seen and ("adjacent runs", True) in seen
