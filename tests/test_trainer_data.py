"""Trainer materialization against a real mmstore process and the tiny Qwen2-VL's HF processor:
pixels equal the processor's on the original files, wrong descriptors and missing images are
named, sample files round-trip, the loader keeps order within its bound."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mmstore_client import StoreClient, compute_digest
from mmstore_client.render import Renderer
from mmstore_client.samples import Sample, SampleFileError, read_samples, sample_from_rendered, write_samples
from mmstore_trainer import Loader, MaterializationError, Materializer, MissingImagePolicy
from mmstore_trainer.data import PLACEHOLDER_RGB
from PIL import Image
from support import FetchingRenderer, ImageSet, image_bytes

SIZES = [(100, 140), (300, 200), (640, 480)]


def conversation(refs: list[str], answer: str = "The answer is 42.") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": r}} for r in refs]
    return [
        {"role": "user", "content": [*parts, {"type": "text", "text": "How many objects are there?"}]},
        {"role": "assistant", "content": answer},
    ]


def make_sample(renderer: Renderer, refs: list[str], sample_id: str, advantages=1.0, **kw) -> Sample:
    """A rendered two-message conversation over ``refs`` as a training sample."""
    rendered = renderer.render(conversation(refs, **kw), add_generation_prompt=False)
    return sample_from_rendered(rendered, sample_id=sample_id, advantages=advantages)


def upload(
    client: StoreClient, run: str, sizes, seed: int, fmt: str = "PNG"
) -> tuple[list[str], list[bytes]]:
    blobs = [image_bytes(w, h, fmt, seed + i) for i, (w, h) in enumerate(sizes)]
    return [f"mmstore://blobs/{client.put(b, run).digest}" for b in blobs], blobs


@pytest.fixture(scope="module")
def client(store):
    with StoreClient(store.url) as c:
        yield c


@pytest.fixture(scope="module")
def renderer(tiny_qwen2_vl, client):
    return FetchingRenderer(Renderer.from_pretrained(tiny_qwen2_vl), client)


@pytest.fixture(scope="module")
def processor(tiny_qwen2_vl):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_qwen2_vl))


def materializer(model_dir, store_url, processor, policy=MissingImagePolicy.ERROR) -> Materializer:
    """A fresh store client each time: no bytes cached from the uploads or other tests."""
    return Materializer.from_pretrained(
        model_dir, StoreClient(store_url), missing_images=policy, processor=processor
    )


def test_materialized_equals_hf_processor_on_files(
    tiny_qwen2_vl, store, client, renderer, processor, tmp_path
):
    refs, blobs = upload(client, "trainer-data", SIZES, seed=100)
    jrefs, jblobs = upload(client, "trainer-data", [(333, 251)], seed=200, fmt="JPEG")
    samples = [make_sample(renderer, refs[:2], "a"), make_sample(renderer, [*jrefs, refs[2]], "b")]
    files = {}
    for i, data in enumerate([*blobs, *jblobs]):
        files[compute_digest(data)] = tmp_path / f"img{i}"
        files[compute_digest(data)].write_bytes(data)
    mat = materializer(tiny_qwen2_vl, store.url, processor)
    with Loader(samples, mat, workers=2, prefetch=2) as loader:
        threaded = list(loader)
    for sample, got in zip(samples, threaded, strict=True):
        again = mat(sample)  # sequential: the same tensors as the loader threads
        hf_messages = [{"role": "user", "content": [{"type": "image"}] * len(sample.descriptors)}]
        hf_messages[0]["content"] = [*hf_messages[0]["content"], conversation([])[0]["content"][-1]]
        hf_messages.append(conversation([])[1])
        text = processor.apply_chat_template(hf_messages, tokenize=False)
        originals = [Image.open(files[d.digest]) for d in sample.descriptors]
        ref = processor(text=[text], images=originals, return_tensors="pt")
        assert ref["input_ids"][0].tolist() == sample.token_ids
        ours = torch.cat([im.tensors["pixel_values"] for im in got.images])
        assert torch.equal(ours, ref["pixel_values"])
        assert torch.equal(torch.cat([im.tensors["pixel_values"] for im in again.images]), ours)
        assert [list(g) for g in got.grids] == ref["image_grid_thw"].tolist()
        assert [tuple(d.grid) for d in sample.descriptors] == got.grids
        assert got.loss_mask.tolist() == sample.loss_mask and got.missing_images == 0
        assert got.fetched_bytes == sum(len(files[d.digest].read_bytes()) for d in sample.descriptors)


def _tamper(sample: Sample, what: str) -> Sample:
    data = sample.model_dump()
    desc, span = data["descriptors"][0], data["image_spans"][0]
    if what == "size":
        desc["width"] += 1
    elif what == "grid":
        desc["grid"] = (1, desc["grid"][1] + 2, desc["grid"][2])
    elif what == "fingerprint":
        desc["fingerprint"] = "0" * 16
    elif what == "num_tokens":  # descriptor and span say 4 more tokens than the ids hold
        desc["num_tokens"] += 4
        span["length"] += 4
    elif what == "processor_count":  # ids, span and descriptor agree on 4 more than the processor
        end = span["start"] + span["length"]
        pad = data["token_ids"][span["start"]]
        for key, fill in (("token_ids", pad), ("loss_mask", False), ("logprobs", 0.0)):
            data[key][end:end] = [fill] * 4
        desc["num_tokens"] += 4
        span["length"] += 4
    return Sample.model_validate(data)


@pytest.mark.parametrize(
    ("what", "check"),
    [
        ("size", "size"),
        ("grid", "grid"),
        ("fingerprint", "fingerprint"),
        ("num_tokens", "num_tokens"),
        ("processor_count", "num_tokens"),
    ],
)
def test_wrong_descriptor_is_named(tiny_qwen2_vl, store, client, renderer, processor, what, check):
    refs, _ = upload(client, "trainer-data", SIZES[:1], seed=300)
    bad = _tamper(make_sample(renderer, refs, f"bad-{what}"), what)
    with pytest.raises(MaterializationError) as exc:
        materializer(tiny_qwen2_vl, store.url, processor)(bad)
    err = exc.value
    assert (err.what, err.sample_id, err.image) == (check, f"bad-{what}", 0)
    assert err.digest == bad.descriptors[0].digest
    assert f"bad-{what}" in str(err) and "image 0" in str(err)
    assert str(err.expected) in str(err) and str(err.actual) in str(err)


def test_missing_images_policies(tiny_qwen2_vl, store, client, renderer, processor):
    run = f"trainer-doomed-{uuid.uuid4().hex[:8]}"
    refs, _ = upload(client, run, [(120, 90)], seed=400)
    kept, _ = upload(client, "trainer-data", [(90, 120)], seed=401)
    gone = make_sample(renderer, [*kept, *refs], "gone")
    # an image never uploaded: rendered from local bytes, unknown to the store
    local = image_bytes(80, 60, seed=402)
    never = FetchingRenderer(
        Renderer.from_pretrained(tiny_qwen2_vl), ImageSet({compute_digest(local): local})
    )
    never_sample = make_sample(never, [f"mmstore://blobs/{compute_digest(local)}"], "never")
    client.delete_run(run)
    client.gc(grace_seconds=0)
    assert not client.head(gone.descriptors[1].digest)

    for sample, image in ((gone, 1), (never_sample, 0)):
        with pytest.raises(MaterializationError) as exc:
            materializer(tiny_qwen2_vl, store.url, processor)(sample)
        assert (exc.value.what, exc.value.image) == ("missing", image)
        assert "--missing-images placeholder_zero_loss" in str(exc.value)

        got = materializer(tiny_qwen2_vl, store.url, processor, MissingImagePolicy.PLACEHOLDER_ZERO_LOSS)(
            sample
        )
        assert got.missing_images == 1 and not got.loss_mask.any() and any(sample.loss_mask)
        assert got.grids == [tuple(d.grid) for d in sample.descriptors]  # geometry unchanged
        desc = sample.descriptors[image]
        grey = processor.image_processor(
            images=[Image.new("RGB", (desc.width, desc.height), PLACEHOLDER_RGB)], return_tensors="pt"
        )
        assert torch.equal(got.images[image].tensors["pixel_values"], torch.as_tensor(grey["pixel_values"]))


def test_sample_files_round_trip(renderer, client, tmp_path):
    refs, _ = upload(client, "trainer-data", SIZES[:2], seed=500)
    base = make_sample(renderer, refs, "per-token")
    per_token = Sample.model_validate(
        base.model_dump() | {"advantages": [0.5] * len(base.token_ids), "reward": 1.0, "meta": {"k": "v"}}
    )
    one_token = Sample(sample_id="one", token_ids=[5], loss_mask=[False], advantages=[2.0], logprobs=[0.0])
    samples = [per_token, make_sample(renderer, refs[:1], "scalar", advantages=-1.5), one_token]
    for suffix in (".jsonl", ".parquet"):
        path = tmp_path / f"samples{suffix}"
        assert write_samples(path, samples) == 3
        assert list(read_samples(path)) == samples

    # processed payloads and unknown fields are refused, with the file and record named
    bad = base.model_dump(mode="json") | {"pixel_values": [[0.0]]}
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(per_token.model_dump_json() + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(SampleFileError, match=r"(?s)bad\.jsonl:2: .*pixel_values"):
        list(read_samples(jsonl))
    table = pq.read_table(tmp_path / "samples.parquet")
    table = table.append_column("pixel_values", pa.array([[0.0]] * 3, pa.list_(pa.float64())))
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(SampleFileError, match=r"(?s)row 0: .*pixel_values"):
        list(read_samples(tmp_path / "bad.parquet"))
    with pytest.raises(SampleFileError, match=r"jsonl or \.parquet"):
        list(read_samples(tmp_path / "samples.csv"))


def test_loader_order_bound_and_errors():
    in_flight = peak = 0
    lock = threading.Lock()

    def work(i: int) -> int:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.001 * ((i * 7) % 5))
        if i == 17:
            raise ValueError("item 17")
        return i * i

    def done(_: int) -> None:
        nonlocal in_flight
        with lock:
            in_flight -= 1

    with Loader(range(16), work, workers=4, prefetch=3, on_done=done) as loader:
        assert list(loader) == [i * i for i in range(16)]
    assert peak <= 3  # never more than `prefetch` results ahead of the consumer
    with Loader(range(16), work, workers=0) as loader:
        got, wait = loader.take(5)
        assert got == [0, 1, 4, 9, 16] and wait > 0
    with Loader(range(20), work, workers=2, prefetch=4) as loader:
        assert loader.take(17)[0] == [i * i for i in range(17)]
        with pytest.raises(ValueError, match="item 17"):
            next(loader)
