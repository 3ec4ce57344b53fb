"""The viewer (``/ui``), the rollout-metadata API, thumbnails and the smoke plots.

In-process (``httpx.ASGITransport``) for breadth; a real ``mmstore serve`` and a real headless
Chromium (Debian's package, driven by Playwright, never a downloaded browser) for what only a
browser shows: thumbnails decode, a rollout page shows its pictures and reward, a store with
tokens refuses a browser without one. The rollouts come from the real rollout worker with a
scripted stand-in for the inference service (no vLLM here; ``test_smoke`` runs the real one).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest
from mmstore.app import create_app
from mmstore.settings import Settings
from mmstore_client import AsyncStoreClient, StoreClient, decode
from mmstore_client.descriptor import Descriptor
from mmstore_client.digest import compute_digest
from mmstore_client.inference import Completion, GenerateResponse, SamplingOptions, Timings, Usage
from mmstore_client.models import BlobInfo
from mmstore_client.rollouts import (
    ImageAt,
    RolloutDoc,
    RolloutTurn,
    get_rollout,
    put_rollout,
    rollout_turns,
    rollouts_page,
)
from PIL import Image
from support import FetchingRenderer, ImageSet, image_bytes

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = os.environ.get("MMSTORE_UI_SCREENSHOTS")  # a folder: save the pages shown (docs/)


# -- helpers --------------------------------------------------------------------------------
def descriptor(data: bytes, num_tokens: int = 4) -> Descriptor:
    header = decode.probe(data)
    return Descriptor(
        digest=compute_digest(data),
        mime=header.mime,
        width=header.width,
        height=header.height,
        family="qwen2_vl",
        layout={"patch_size": 14, "merge_size": 2},
        fingerprint="0" * 16,
        grid=(1, 2, 2 * num_tokens),
        num_tokens=num_tokens,
    )


def a_doc(images: list[bytes], rollout_id: str = "r-0", reward: float = 0.5) -> RolloutDoc:
    descs = [descriptor(d) for d in images]
    return RolloutDoc(
        rollout_id=rollout_id,
        step=1,
        reward=reward,
        descriptors=descs,
        turns=[
            RolloutTurn(
                prompt="<|im_start|>user\n<|vision_start|><|vision_end|>How many?",
                images=[ImageAt(index=i, offset=34) for i in range(len(descs))],
                completion="3<|im_end|>",
                completion_tokens=2,
                reward=reward,
            )
        ],
    )


@pytest.fixture
async def local(tmp_path):
    """An in-process store (no process, no port) and a client for it."""
    app = create_app(Settings(root=tmp_path / "data", fsync=False))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mmstore") as client:
        client.app = app
        yield client


def jpeg_with_orientation(width: int, height: int, orientation: int) -> bytes:
    img = Image.new("RGB", (width, height), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, width // 2, height // 3))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=90)
    return buf.getvalue()


# -- the rollout-metadata API ---------------------------------------------------------------
async def test_rollout_documents_keep_long_tool_output_and_refuse_base64_images(local):
    doc = a_doc([])
    turn = doc.turns[0]
    digests = "\n".join(compute_digest(bytes([i])).removeprefix("blake3:") for i in range(64))  # 4,159 chars
    long = doc.model_copy(update={"turns": [turn.model_copy(update={"prompt": turn.prompt + digests})]})
    r = await local.post("/v1/runs/rl/rollouts", content=long.model_dump_json())
    assert r.status_code == 201, r.text
    b64 = base64.b64encode(image_bytes(40, 40, seed=3)).decode()
    bad = long.model_dump(mode="json")
    bad["turns"][0]["prompt"] = b64
    r = await local.post("/v1/runs/rl/rollouts", content=json.dumps(bad))
    assert r.status_code in (400, 422) and "processed image payload" in r.text, r.text


async def test_rollout_documents_roundtrip_in_a_companion_run(local):
    images = [image_bytes(64, 48, seed=1), image_bytes(30, 90, seed=2)]
    for data in images:
        assert (await local.put(f"/v1/runs/rl/blobs/{compute_digest(data)}", content=data)).status_code == 201
    doc = a_doc(images)
    digest, body = doc.encode()
    r = await local.put(f"/v1/runs/rl/rollouts/{digest}", content=body)
    assert r.status_code == 201, r.text
    assert r.json() | {"size": 0} == {
        "digest": digest,
        "size": 0,
        "rollout_id": "r-0",
        "step": 1,
        "reward": 0.5,
        "turns": 1,
        "images": 2,
        "image_tokens": 8,
    }
    assert (await local.put(f"/v1/runs/rl/rollouts/{digest}", content=body)).status_code == 200  # idempotent
    assert (await local.post("/v1/runs/rl/rollouts", content=body)).status_code == 200
    got = await local.get(f"/v1/rollouts/{digest}")
    assert got.content == body and got.headers["content-type"] == "application/json"
    assert RolloutDoc.model_validate_json(got.content) == doc

    page = (await local.get("/v1/runs/rl/rollouts")).json()
    assert [r["digest"] for r in page["rollouts"]] == [digest] and page["next_cursor"] is None
    # the image run stays images only; the documents are the blobs of "rl.rollouts"
    blobs = (await local.get("/v1/runs/rl/blobs")).json()["blobs"]
    assert sorted(b["digest"] for b in blobs) == sorted(compute_digest(d) for d in images)
    (companion,) = (await local.get("/v1/runs/rl.rollouts/blobs")).json()["blobs"]
    assert (
        companion
        == BlobInfo(
            digest=digest, size=len(body), mime="application/json", format="JSON", width=0, height=0
        ).model_dump()
    )
    # a run without rollouts: an empty page; an unknown run: 404
    await local.put(f"/v1/runs/plain/blobs/{compute_digest(images[0])}", content=images[0])
    assert (await local.get("/v1/runs/plain/rollouts")).json() == {
        "run": "plain",
        "rollouts": [],
        "next_cursor": None,
    }
    assert (await local.get("/v1/runs/nope/rollouts")).status_code == 404


async def test_rollout_documents_are_checked(local):
    doc = a_doc([image_bytes(8, 8)])
    _, body = doc.encode()
    image = image_bytes(16, 16, seed=9)
    await local.put(f"/v1/runs/rl/blobs/{compute_digest(image)}", content=image)

    def code(r: httpx.Response) -> str:
        return r.json()["error"]["code"]

    r = await local.put(f"/v1/runs/rl/rollouts/{compute_digest(b'other')}", content=body)
    assert r.status_code == 422 and code(r) == "digest_mismatch"
    r = await local.put(f"/v1/runs/rl/rollouts/{compute_digest(b'{')}", content=b"{")
    assert r.status_code == 400 and code(r) == "invalid_request"
    # an image is not a rollout document, even when the store already has it
    r = await local.put(f"/v1/runs/rl/rollouts/{compute_digest(image)}", content=image)
    assert r.status_code == 400 and (await local.get("/v1/runs/rl.rollouts")).status_code == 404
    payload = doc.model_dump(mode="json") | {"meta": {"pixel_values": 1}}
    r = await local.post("/v1/runs/rl/rollouts", json=payload)
    assert r.status_code == 400 and "pixel_values" in r.text
    bad_index = doc.model_dump(mode="json")
    bad_index["turns"][0]["images"] = [{"index": 5, "offset": 0}]
    r = await local.post("/v1/runs/rl/rollouts", json=bad_index)
    assert r.status_code == 400 and "descriptors" in r.text
    r = await local.post("/v1/runs/rl.rollouts/rollouts", content=body)
    assert r.status_code == 400 and code(r) == "invalid_run"
    r = await local.post(f"/v1/runs/{'r' * 120}/rollouts", content=body)
    assert r.status_code == 400 and "at most 119" in r.text
    r = await local.post("/v1/runs/rl/rollouts", content=b"{" + b" " * (4 << 20) + b"}")
    assert r.status_code == 413
    r = await local.get(f"/v1/rollouts/{compute_digest(image)}")  # an image, not a document
    assert r.status_code == 404


async def test_pages_refuse_a_malformed_run_id_as_the_api_does(local):
    """A run id the store could never hold is a bad request (400 invalid_run), not an unknown run."""
    for path in ("/ui/runs/-bad", "/ui/runs/-bad/rollouts", f"/ui/runs/-bad/rollouts/{compute_digest(b'x')}"):
        r = await local.get(path)
        assert r.status_code == 400 and "invalid_run" in r.text, (path, r.status_code)
    api = await local.get("/v1/runs/-bad")
    assert api.status_code == 400 and api.json()["error"]["code"] == "invalid_run"
    assert (await local.get("/ui/runs/unknown")).status_code == 404  # well-formed, absent: 404


def test_rollouts_thumbnails_and_pages_on_the_s3_backend(s3_store):
    """The same documents, thumbnails and pages where the store is a bucket (no local root)."""
    images = [image_bytes(120, 80, fmt="JPEG", seed=5), image_bytes(50, 70, seed=6)]
    with StoreClient(s3_store.url) as client:
        for data in images:
            client.put(data, run="viewer-s3")
        info = put_rollout(client, "viewer-s3", a_doc(images, rollout_id="s3-0", reward=1.0))
        assert get_rollout(client, info.digest).rollout_id == "s3-0"
        assert [r.digest for r in rollouts_page(client, "viewer-s3").rollouts] == [info.digest]
    ui = f"{s3_store.url}/ui"
    page = httpx.get(f"{ui}/runs/viewer-s3")
    assert page.status_code == 200 and page.text.count('<li class="card">') == 2
    for data in images:
        digest = compute_digest(data)
        thumb = httpx.get(f"{ui}/thumbs/{digest}")
        assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).format == "WEBP"
        assert httpx.get(f"{ui}/blobs/{digest}").content == data  # streamed from the bucket
    rollout = httpx.get(f"{ui}/runs/viewer-s3/rollouts/{info.digest}")
    assert rollout.status_code == 200 and "1.000" in rollout.text and rollout.text.count("<figure") == 2
    assert "viewer-s3" in httpx.get(ui).text


# -- thumbnails -----------------------------------------------------------------------------
async def test_thumbnails_follow_the_decoding_rule_are_cached_and_never_touch_the_blob(local):
    photo = jpeg_with_orientation(600, 400, orientation=6)  # shown rotated: 400 wide, 600 high
    digest = compute_digest(photo)
    await local.put(f"/v1/runs/pics/blobs/{digest}", content=photo)
    r = await local.get(f"/ui/thumbs/{digest}", params={"size": 256})
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "WEBP" and thumb.size == (171, 256)  # oriented, fits 256, aspect kept
    thumbs = local.app.state.viewer.thumbnails
    assert (thumbs.misses, thumbs.hits) == (1, 0)
    again = await local.get(f"/ui/thumbs/{digest}", params={"size": 256})
    assert again.content == r.content and (thumbs.misses, thumbs.hits) == (1, 1)
    etag = r.headers["etag"]
    assert (await local.get(f"/ui/thumbs/{digest}", headers={"if-none-match": etag})).status_code == 304
    small = await local.get(f"/ui/thumbs/{digest}", params={"size": 128})
    assert max(Image.open(io.BytesIO(small.content)).size) == 128 and thumbs.misses == 2
    # the stored blob is exactly what was uploaded, through the API and the viewer's link
    assert (await local.get(f"/v1/blobs/{digest}")).content == photo
    original = await local.get(f"/ui/blobs/{digest}")
    assert original.content == photo and original.headers["content-security-policy"] == "sandbox"
    blob_file = local.app.state.storage.blob_path(digest)
    assert compute_digest(blob_file.read_bytes()) == digest
    # refusals: an unknown size, an unknown blob, a blob that is not an image
    assert (await local.get(f"/ui/thumbs/{digest}", params={"size": 300})).status_code == 404
    assert (await local.get(f"/ui/thumbs/blake3:{'0' * 64}")).status_code == 404
    _, body = a_doc([photo]).encode()
    doc_digest = (await local.post("/v1/runs/pics/rollouts", content=body)).json()["digest"]
    assert (await local.get(f"/ui/thumbs/{doc_digest}")).status_code == 415


async def test_thumbnails_of_blobs_stored_before_the_decoding_limits_are_refused(local):
    """A JPEG of thousands of scans took 56 s per thumbnail; one stored before the store refused
    it (written to storage directly here) gets the rule's 422, not a decode."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(64, 48, seed=3))).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    hostile = data[:-2] + data[last:-2] * 2000 + data[-2:]
    digest = compute_digest(hostile)
    info = BlobInfo(digest=digest, size=len(hostile), mime="image/jpeg", format="JPEG", width=64, height=48)
    local.app.state.storage.put("old", digest, hostile, info)
    r = await local.get(f"/ui/thumbs/{digest}", params={"size": 128})
    assert r.status_code == 422 and r.json()["error"]["code"] == "image_too_complex"


async def test_thumbnail_cache_is_a_bounded_lru(local):
    from mmstore.thumbnails import ThumbnailCache

    storage = local.app.state.storage
    cache = ThumbnailCache(storage, local.app.state.decoder, max_bytes=3000)
    blobs = []
    for seed in range(12):
        data = image_bytes(200, 150, seed=seed)
        await local.put(f"/v1/runs/lru/blobs/{compute_digest(data)}", content=data)
        blobs.append((compute_digest(data), len(data)))
    for digest, size in blobs:
        await cache.get(digest, 256, size)
    assert cache.cached_bytes <= 3000 and 0 < len(cache) < len(blobs) and cache.evictions > 0
    last_digest, last_size = blobs[-1]
    await cache.get(last_digest, 256, last_size)
    assert cache.hits == 1  # the most recent one stayed
    await cache.get(blobs[0][0], 256, blobs[0][1])
    assert cache.misses == len(blobs) + 1  # the oldest was evicted and is made again


async def test_concurrent_requests_for_one_thumbnail_share_one_generation(local):
    import asyncio

    from mmstore.thumbnails import ThumbnailCache

    storage = local.app.state.storage
    reads = []

    class CountingReads:  # the real storage; counts the reads a generation makes
        def read(self, digest, offset, size):
            reads.append(digest)
            return storage.read(digest, offset, size)

    data = image_bytes(300, 200, seed=77)
    digest = compute_digest(data)
    await local.put(f"/v1/runs/flight/blobs/{digest}", content=data)
    cache = ThumbnailCache(CountingReads(), local.app.state.decoder)
    thumbs = await asyncio.gather(*(cache.get(digest, 128, len(data)) for _ in range(5)))
    assert len(set(thumbs)) == 1 and reads == [digest] and len(cache) == 1
    assert await cache.get(digest, 128, len(data)) == thumbs[0] and reads == [digest]  # now cached


# -- pages ----------------------------------------------------------------------------------
async def test_run_pages_stay_fast_with_10000_blobs(local):
    storage = local.app.state.storage
    digests = []
    for i in range(10_000):
        buf = io.BytesIO()
        Image.new("RGB", (1, 1), (i % 256, i // 256 % 256, 7)).save(buf, "PNG")
        data = buf.getvalue()
        digest = compute_digest(data)
        info = BlobInfo(digest=digest, size=len(data), mime="image/png", format="PNG", width=1, height=1)
        storage.put("big", digest, data, info)
        digests.append(digest)
    digests.sort()
    cards = re.compile(r'<li class="card">')
    for cursor, expect in ((None, 60), (digests[4999], 60), (digests[9959], 40)):
        t = time.perf_counter()
        r = await local.get("/ui/runs/big", params={"cursor": cursor} if cursor else {})
        elapsed = time.perf_counter() - t
        assert r.status_code == 200 and len(cards.findall(r.text)) == expect
        assert elapsed < 0.5, f"a page of the 10,000-blob run took {elapsed:.2f}s"
    assert "10,000" in r.text and 'rel="next"' not in r.text
    first = await local.get("/ui/runs/big")
    next_link = re.search(r'rel="next" href="\?cursor=([^&]+)&amp;page=2', first.text)
    assert next_link and next_link.group(1).replace("%3A", ":") == digests[59]


async def test_login_cookie_is_for_the_pages_only(tmp_path):
    tokens = {"reader": ["read"], "writer": ["write"]}
    app = create_app(Settings(root=tmp_path / "data", fsync=False, tokens=tokens))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c:
        data = image_bytes(20, 20)
        writer = {"authorization": "Bearer writer"}
        r = await c.put(f"/v1/runs/secret-run/blobs/{compute_digest(data)}", content=data, headers=writer)
        assert r.status_code == 201
        r = await c.get("/ui")
        assert r.status_code == 401 and "Sign in" in r.text and "secret-run" not in r.text
        r = await c.post("/ui/login", content=b"token=nope&next=/ui", headers=FORM)
        assert r.status_code == 401 and "unknown bearer token" in r.text and "set-cookie" not in r.headers
        r = await c.post("/ui/login", content=b"token=reader&next=//evil.example/", headers=FORM)
        assert r.status_code == 303 and r.headers["location"] == "/ui"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
        r = await c.get("/ui")  # the cookie jar now holds the token
        assert r.status_code == 200 and "secret-run" in r.text
        assert "<script" not in r.text and "default-src 'none'" in r.headers["content-security-policy"]
        assert (await c.get("/v1/runs")).status_code == 401  # the API never reads the cookie
        r = await c.post("/ui/logout")
        assert r.status_code == 303 and (await c.get("/ui")).status_code == 401
        r = await c.get("/ui", headers={"authorization": "Bearer reader"})
        assert r.status_code == 200


FORM = {"content-type": "application/x-www-form-urlencoded"}


# -- the worker's documents -----------------------------------------------------------------
def test_rollout_turns_cut_images_out_of_the_rendered_text(tiny_qwen2_vl):
    from mmstore_client.digest import make_ref
    from mmstore_client.render import Renderer

    images = ImageSet(
        {compute_digest(d): d for d in (image_bytes(100, 140, seed=3), image_bytes(60, 60, seed=4))}
    )
    refs = [make_ref(d) for d in images]
    renderer = FetchingRenderer(Renderer.from_pretrained(tiny_qwen2_vl), images)
    tok = renderer.tokenizer

    def user(ref: str, text: str) -> dict:
        image = {"type": "image_url", "image_url": {"url": ref}}
        return {"role": "user", "content": [image, {"type": "text", "text": text}]}

    rendered = renderer.render([{"role": "system", "content": "Count."}, user(refs[0], "How many?")])
    marks = [(0, len(rendered.token_ids))]
    rendered = rendered.extend(
        [*tok.encode("3", add_special_tokens=False), renderer.eos_token_id], assistant=True
    )
    marks[0] += (len(rendered.token_ids),)
    bridged = renderer.bridge(rendered, [user(refs[1], "And now?")])
    marks.append((marks[0][2], len(bridged.token_ids)))
    final = bridged.extend(tok.encode("1", add_special_tokens=False), assistant=True)
    marks[1] += (len(final.token_ids),)

    turns = rollout_turns(final, marks, lambda ids: tok.decode(ids, skip_special_tokens=False), [1.0, 0.0])
    assert [[i.index for i in t.images] for t in turns] == [[0], [1]]
    for turn in turns:
        (at,) = turn.images
        assert turn.prompt[: at.offset].endswith("<|vision_start|>")
        assert turn.prompt[at.offset :].startswith("<|vision_end|>")
        assert "<|image_pad|>" not in turn.prompt
    assert "How many?" in turns[0].prompt and "And now?" in turns[1].prompt
    assert turns[0].completion.startswith("3") and turns[1].completion == "1"
    assert [t.reward for t in turns] == [1.0, 0.0] and turns[1].completion_tokens == 1
    RolloutDoc(rollout_id="x", descriptors=final.descriptors, turns=turns)  # a valid document


class ScriptedInference:
    """Stands in for the inference service (no vLLM): sample i of a request answers ``i + 1``."""

    retried = 0

    def __init__(self, renderer, store: StoreClient) -> None:
        self.renderer, self.store = renderer, store

    async def generate(self, request, affinity: str | None = None) -> GenerateResponse:
        tok = self.renderer.tokenizer
        samples = []
        for i in range(request.sampling.n):
            ids = [*tok.encode(f"I count {i + 1}.", add_special_tokens=False), self.renderer.eos_token_id]
            samples.append(Completion(token_ids=ids, logprobs=[-0.7] * len(ids), finish_reason="stop"))
        pixels = [
            decode.pixel_digest(decode.decode_rgb(self.store.get(d.digest))) for d in request.descriptors
        ]
        return GenerateResponse(
            request_id="scripted",
            prompt_token_ids=request.prompt_token_ids,
            pixel_digests=pixels,
            samples=samples,
            usage=Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=len(ids)),
            timings=Timings(fetch_s=0.002, process_s=0.001, generate_s=0.01, total_s=0.013),
        )


async def run_worker(url: str, model_dir: Path, run: str, *, groups: int, token: str | None = None):
    """The real rollout worker (offload, render, bridge, reward, upload), scripted inference."""
    from mmstore_client.render import Renderer
    from mmstore_rollout.stats import LoopStats
    from mmstore_rollout.worker import RolloutWorker

    async with AsyncStoreClient(url, token=token) as store:
        with StoreClient(url, token=token, cache=store.cache) as sync_store:
            renderer = Renderer.from_pretrained(model_dir)
            inference = ScriptedInference(renderer, sync_store)
            worker = RolloutWorker(
                store, inference, renderer, run, LoopStats(), SamplingOptions(max_tokens=8)
            )
            for seed in range(groups):
                await worker.rollout_group(seed, turns=2, n=2)
    return worker


async def test_worker_uploads_one_document_per_rollout(store, tiny_qwen2_vl):
    worker = await run_worker(store.url, tiny_qwen2_vl, "viewer-worker", groups=1)
    assert worker.rollout_docs == 2 and worker.fetch_s == [0.002] * 3  # turn 1: n=2; turn 2: 1 each
    with StoreClient(store.url) as client:
        page = rollouts_page(client, "viewer-worker")
        assert sorted(r.rollout_id for r in page.rollouts) == ["seed0-0", "seed0-1"]
        doc = get_rollout(client, page.rollouts[0].digest)
    assert len(doc.turns) == 2 and len(doc.descriptors) == 2 and doc.step == 0
    assert doc.turns[1].completion.startswith("I count 1.")
    assert [i.index for t in doc.turns for i in t.images] == [0, 1]


# -- plots ----------------------------------------------------------------------------------
def test_smoke_plots_are_written(tmp_path):
    from mmstore_rollout.plots import write_plots

    paths = write_plots(
        tmp_path,
        rewards_by_step={0: [0.0, 1.0], 1: [0.5, 0.5]},
        loss_per_step=[0.3, 0.2, 0.25],
        fetch_s=[0.001 * i for i in range(1, 30)],
        bytes_refs=2_000,
        bytes_base64=90_000,
        bytes_pixel_values=3_000_000,
    )
    assert [p.name for p in paths] == [
        "reward_per_step.png",
        "loss_per_step.png",
        "fetch_latency.png",
        "bytes_on_the_wire.png",
    ]
    for path in paths:
        assert Image.open(path).format == "PNG" and Image.open(path).size[0] > 400
    nothing = dict(rewards_by_step={}, loss_per_step=[], fetch_s=[], bytes_refs=0, bytes_base64=0)
    empty = write_plots(tmp_path / "empty", **nothing, bytes_pixel_values=0)
    assert all(p.exists() for p in empty)


# -- a real browser -------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def browser():
    if not CHROMIUM.exists():
        pytest.skip(
            "headless Chromium not found at /usr/bin/chromium: install Debian's package "
            "(apt-get install -y chromium); .ci/run installs it"
        )
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("playwright is not installed (root dev group): run make install")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture(scope="module")
async def browsed_run(store, tiny_qwen2_vl):
    """A run with pictures in six formats and the worker's rollouts, on the session's store."""
    run = "viewer-e2e"
    with StoreClient(store.url) as client:
        for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):  # browsers draw only some of these
            client.put(image_bytes(90, 60, fmt=fmt, seed=len(fmt)), run=run)
    await run_worker(store.url, tiny_qwen2_vl, run, groups=2)
    return run


async def loaded_images(page) -> list[tuple[bool, int]]:
    return await page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")


async def shot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=True)


async def test_browser_runs_and_thumbnail_grid(browser, store, browsed_run):
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    r = await page.goto(f"{store.url}/ui")
    assert r.status == 200
    row = page.locator("tr", has_text=browsed_run).first
    assert "10" in await row.inner_text()  # 6 uploaded + 4 worker pictures (2 groups x 2 turns)
    await row.get_by_role("link", name=browsed_run).click()
    await page.wait_for_load_state("load")
    assert page.url.endswith(f"/ui/runs/{browsed_run}")
    images = await loaded_images(page)
    assert len(images) == 10 and all(complete and width > 0 for complete, width in images), images
    text = await page.locator("ul.grid").inner_text()
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        assert fmt in text
    assert "90\u00d760" in text and re.search(r"[0-9a-f]{12}…", text)
    await shot(page, "viewer-run.png")
    await page.close()


async def test_browser_rollout_page_shows_images_reward_and_tokens(browser, store, browsed_run):
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(f"{store.url}/ui/runs/{browsed_run}/rollouts")
    rows = page.locator("table.rollouts tbody tr")
    assert await rows.count() == 4
    await page.get_by_role("link", name="seed1-0").click()
    await page.wait_for_load_state("load")
    assert "/rollouts/blake3:" in page.url
    images = await loaded_images(page)
    assert len(images) == 2 and all(complete and width > 0 for complete, width in images), images
    reward = await page.locator("#reward").inner_text()
    assert re.fullmatch(r"reward \d\.\d{3}", reward.strip())
    assert await page.locator("section.turn").count() == 2
    captions = await page.locator("figcaption").all_inner_texts()
    assert len(captions) == 2 and all(re.search(r"\d+ tokens", c) for c in captions)
    assert "I count 1." in await page.locator(".completion").first.inner_text()
    assert await page.locator("script").count() == 0
    await shot(page, "viewer-rollout.png")
    await page.close()


async def test_browser_is_refused_without_a_token(browser, auth_store):
    with StoreClient(auth_store.url, token="writer") as client:
        info = client.put(image_bytes(40, 30, seed=77), run="viewer-private")
    anonymous = await browser.new_context()
    page = await anonymous.new_page()
    r = await page.goto(f"{auth_store.url}/ui")
    assert r.status == 401 and "viewer-private" not in await page.content()
    thumb = await anonymous.request.get(f"{auth_store.url}/ui/thumbs/{info.digest}")
    assert thumb.status == 401
    r = await page.goto(f"{auth_store.url}/ui/runs/viewer-private")
    assert r.status == 401
    # the same token as the API, entered once: the pages and their thumbnails then load
    await page.fill("input[name=token]", "reader")
    await page.click("button[type=submit]")
    await page.wait_for_load_state("load")
    assert page.url.endswith("/ui/runs/viewer-private")
    images = await loaded_images(page)
    assert images and all(complete and width > 0 for complete, width in images)
    await anonymous.close()
    # or a bearer header, like any API client
    bearer = await browser.new_context(extra_http_headers={"authorization": "Bearer reader"})
    r = await (await bearer.new_page()).goto(f"{auth_store.url}/ui")
    assert r.status == 200
    await bearer.close()
