"""The store's HTTP API, black-box against a real `mmstore serve` process."""

from __future__ import annotations

import http.client
import io

import httpx
import pytest
from mmstore_client.digest import compute_digest
from PIL import Image
from support import image_bytes

RUN = "run-api"


# Every test below runs against each storage backend: conftest's `store` / `auth_store` are the
# local ones, `s3_store` / `s3_auth_store` serve a bucket of a real S3-compatible server.
@pytest.fixture(scope="session")
def store(store, store_backend, request):
    return store if store_backend == "local" else request.getfixturevalue("s3_store")


@pytest.fixture(scope="session")
def auth_store(auth_store, store_backend, request):
    return auth_store if store_backend == "local" else request.getfixturevalue("s3_auth_store")


def put(store, data: bytes, run: str = RUN, digest: str | None = None, **kw) -> httpx.Response:
    digest = digest or compute_digest(data)
    return httpx.put(f"{store.url}/v1/runs/{run}/blobs/{digest}", content=data, **kw)


def error_code(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return body["error"]["code"]


def raw_request(store, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """http.client sends the path exactly as given (httpx would normalise dot segments)."""
    conn = http.client.HTTPConnection("127.0.0.1", store.port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    return r.status, r.read()


def test_put_get_roundtrip_bytes_exact(store):
    data = image_bytes(37, 23, "PNG", seed=1)
    digest = compute_digest(data)
    r = put(store, data)
    assert r.status_code == 201
    info = r.json()
    assert info == {
        "digest": digest,
        "size": len(data),
        "mime": "image/png",
        "format": "PNG",
        "width": 37,
        "height": 23,
    }
    g = httpx.get(f"{store.url}/v1/blobs/{digest}")
    assert g.status_code == 200
    assert g.content == data
    assert g.headers["content-type"] == "image/png"
    assert g.headers["content-length"] == str(len(data))
    assert g.headers["etag"] == f'"{digest}"'
    assert g.headers["cache-control"] == "public, max-age=31536000, immutable"
    # second PUT: 200, same info, and the blob is linked to the other run too
    again = put(store, data, run="run-api-other")
    assert again.status_code == 200 and again.json() == info
    assert httpx.get(f"{store.url}/v1/runs/run-api-other").json()["blob_count"] == 1


@pytest.mark.parametrize(
    "fmt,mime",
    [
        ("JPEG", "image/jpeg"),
        ("WEBP", "image/webp"),
        ("GIF", "image/gif"),
        ("BMP", "image/bmp"),
        ("TIFF", "image/tiff"),
    ],
)
def test_accepted_formats_by_content(store, fmt, mime):
    data = image_bytes(20, 10, fmt, seed=2)
    # the client's Content-Type is ignored: the content decides
    r = put(store, data, headers={"content-type": "text/plain"})
    assert r.status_code == 201, r.text
    assert r.json()["mime"] == mime and r.json()["format"] == fmt
    assert httpx.get(f"{store.url}/v1/blobs/{compute_digest(data)}").headers["content-type"] == mime


def test_post_computes_digest(store):
    data = image_bytes(11, 13, seed=3)
    r = httpx.post(f"{store.url}/v1/runs/{RUN}/blobs", content=data)
    assert r.status_code == 201 and r.json()["digest"] == compute_digest(data)
    assert httpx.post(f"{store.url}/v1/runs/{RUN}/blobs", content=data).status_code == 200


def test_head_info_range_and_conditional(store):
    data = image_bytes(50, 50, seed=4)
    digest = compute_digest(data)
    put(store, data)
    h = httpx.head(f"{store.url}/v1/blobs/{digest}")
    assert h.status_code == 200 and h.content == b"" and h.headers["content-length"] == str(len(data))
    info = httpx.get(f"{store.url}/v1/blobs/{digest}/info").json()
    assert (info["width"], info["height"], info["size"]) == (50, 50, len(data))
    r = httpx.get(f"{store.url}/v1/blobs/{digest}", headers={"range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
    r = httpx.get(f"{store.url}/v1/blobs/{digest}", headers={"range": "bytes=-5"})
    assert r.status_code == 206 and r.content == data[-5:]
    r = httpx.get(f"{store.url}/v1/blobs/{digest}", headers={"range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and error_code(r) == "range_not_satisfiable"
    r = httpx.get(f"{store.url}/v1/blobs/{digest}", headers={"if-none-match": f'"{digest}"'})
    assert r.status_code == 304 and r.content == b""


def test_missing_and_link(store):
    present = image_bytes(9, 9, seed=5)
    put(store, present)
    absent = compute_digest(b"never uploaded")
    r = httpx.post(f"{store.url}/v1/blobs:missing", json={"digests": [compute_digest(present), absent]})
    assert r.json() == {"missing": [absent]}
    r = httpx.post(
        f"{store.url}/v1/runs/run-linked/blobs:link", json={"digests": [compute_digest(present), absent]}
    )
    assert r.status_code == 200
    assert [b["digest"] for b in r.json()["linked"]] == [compute_digest(present)]
    assert r.json()["missing"] == [absent]
    assert httpx.get(f"{store.url}/v1/runs/run-linked").json()["blob_count"] == 1


def test_runs_listing_and_pagination(store):
    run = "run-pages"
    digests = sorted(put(store, image_bytes(8, 8, seed=100 + i), run=run).json()["digest"] for i in range(7))
    info = httpx.get(f"{store.url}/v1/runs/{run}").json()
    assert info["blob_count"] == 7 and info["bytes"] > 0
    seen, cursor = [], None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = httpx.get(f"{store.url}/v1/runs/{run}/blobs", params=params).json()
        seen += [b["digest"] for b in page["blobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == digests
    assert run in [r["run"] for r in httpx.get(f"{store.url}/v1/runs").json()["runs"]]


def test_delete_run_and_gc_keep_shared_blobs(store):
    shared, only_a = image_bytes(12, 12, seed=200), image_bytes(12, 12, seed=201)
    put(store, shared, run="gc-a")
    put(store, only_a, run="gc-a")
    put(store, shared, run="gc-b")
    r = httpx.delete(f"{store.url}/v1/runs/gc-a")
    assert r.status_code == 200 and r.json() == {"run": "gc-a", "unlinked": 2, "orphaned": 1}
    assert httpx.get(f"{store.url}/v1/runs/gc-a").status_code == 404
    # within the grace period nothing is deleted
    report = httpx.post(f"{store.url}/v1/gc", json={"grace_seconds": 3600}).json()
    assert report["deleted"] == 0 and report["garbage_in_grace"] >= 1
    assert httpx.get(f"{store.url}/v1/blobs/{compute_digest(only_a)}").status_code == 200
    report = httpx.post(f"{store.url}/v1/gc", json={"grace_seconds": 0}).json()
    assert report["deleted"] >= 1 and report["bytes_freed"] >= len(only_a)
    assert httpx.get(f"{store.url}/v1/blobs/{compute_digest(only_a)}").status_code == 404
    assert httpx.get(f"{store.url}/v1/blobs/{compute_digest(shared)}").content == shared
    # a collected blob can be uploaded again
    assert put(store, only_a, run="gc-c").status_code == 201


# -- errors, with real hostile inputs -------------------------------------------------------


def test_invalid_digest(store):
    data = image_bytes(seed=6)
    for bad in ["sha256:" + "0" * 64, "blake3:" + "A" * 64, "blake3:abc", "nonsense"]:
        assert error_code(put(store, data, digest=bad)) == "invalid_digest"
        r = httpx.get(f"{store.url}/v1/blobs/{bad}")
        assert r.status_code == 400 and error_code(r) == "invalid_digest"
    r = httpx.post(f"{store.url}/v1/blobs:missing", json={"digests": ["nope"]})
    assert r.status_code == 400 and error_code(r) == "invalid_digest"


def test_not_found(store):
    digest = compute_digest(b"absent")
    for url in (
        f"/v1/blobs/{digest}",
        f"/v1/blobs/{digest}/info",
        "/v1/runs/no-such-run",
        "/v1/runs/no-such-run/blobs",
    ):
        r = httpx.get(store.url + url)
        assert r.status_code == 404 and error_code(r) == "not_found", url
    assert httpx.head(f"{store.url}/v1/blobs/{digest}").status_code == 404


def test_digest_mismatch(store):
    data, other = image_bytes(seed=7), image_bytes(seed=8)
    r = put(store, data, digest=compute_digest(other))
    assert r.status_code == 422 and error_code(r) == "digest_mismatch"
    assert r.json()["error"]["actual"] == compute_digest(data)
    assert httpx.get(f"{store.url}/v1/blobs/{compute_digest(other)}").status_code == 404


def test_garbage_and_non_images_are_415(store):
    for body in [b"garbage bytes, not an image at all", b"%PDF-1.4 fake", b""]:
        r = put(store, body)
        assert r.status_code == 415 and error_code(r) == "unsupported_media_type"
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, format="ICO")
    r = put(store, ico.getvalue())
    assert r.status_code == 415, "ICO is a real image but not an accepted format"


def test_truncated_images_are_422_and_not_stored(store):
    for fmt in ("PNG", "JPEG"):
        data = image_bytes(200, 150, fmt, seed=9)
        cut = data[: len(data) * 2 // 3]
        r = put(store, cut)
        assert r.status_code == 422 and error_code(r) == "corrupt_image", (fmt, r.text)
        assert httpx.get(f"{store.url}/v1/blobs/{compute_digest(cut)}").status_code == 404


def test_decompression_bomb_is_422(store):
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # a tiny file that decodes to 400 MP
    assert len(buf.getvalue()) < 200_000
    r = put(store, buf.getvalue())
    assert r.status_code == 422 and error_code(r) == "image_too_large"


def test_oversize_body_is_413(tmp_path):
    from support import store_process

    server = store_process(tmp_path / "data", max_upload_bytes="50000").start()
    try:
        big = image_bytes(300, 300, "BMP", seed=10)  # ~270 KB
        r = put(server, big)
        assert r.status_code == 413 and error_code(r) == "payload_too_large"

        def chunks():  # no Content-Length: the limit is enforced while streaming
            for i in range(0, len(big), 8192):
                yield big[i : i + 8192]

        r = httpx.put(f"{server.url}/v1/runs/r/blobs/{compute_digest(big)}", content=chunks())
        assert r.status_code == 413 and error_code(r) == "payload_too_large"
        assert put(server, image_bytes(seed=11)).status_code == 201
    finally:
        server.stop()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/runs/../blobs",
        "/v1/runs/%2e%2e/blobs",
        "/v1/runs/.hidden/blobs",
        "/v1/runs/a%2fb/blobs",
        "/v1/runs/" + "x" * 129 + "/blobs",
        "/v1/runs/-lead/blobs",
    ],
)
def test_hostile_run_ids(store, path):
    status, body = raw_request(store, "POST", path, body=image_bytes(seed=12))
    assert status in (400, 404), (path, status, body)
    if status == 400:
        assert b'"invalid_run"' in body


def test_hostile_digest_paths(store):
    for path in ["/v1/blobs/..%2f..%2fetc%2fpasswd", "/v1/blobs/%2e%2e", "/v1/blobs/blake3:..%2F" + "a" * 60]:
        status, body = raw_request(store, "GET", path)
        assert status in (400, 404) and b"root:" not in body, (path, status)


def test_health_metrics_openapi(store):
    assert httpx.get(f"{store.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{store.url}/readyz").json() == {"status": "ready"}
    m = httpx.get(f"{store.url}/metrics").text
    assert "mmstore_requests_total" in m and "mmstore_bytes_out_total" in m
    paths = httpx.get(f"{store.url}/openapi.json").json()["paths"]
    for p in ["/v1/runs/{run}/blobs/{digest}", "/v1/blobs/{digest}", "/v1/blobs:missing", "/v1/gc"]:
        assert p in paths
    assert httpx.get(f"{store.url}/docs").status_code == 200


# -- auth ----------------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_auth_scopes(auth_store):
    data = image_bytes(seed=13)
    digest = compute_digest(data)
    assert error_code(put(auth_store, data)) == "unauthorized"
    assert put(auth_store, data, headers=bearer("wrong")).status_code == 401
    r = put(auth_store, data, headers=bearer("reader"))
    assert r.status_code == 403 and error_code(r) == "forbidden"
    assert put(auth_store, data, headers=bearer("writer")).status_code == 201
    assert httpx.get(f"{auth_store.url}/v1/blobs/{digest}").status_code == 401
    assert httpx.get(f"{auth_store.url}/v1/blobs/{digest}", headers=bearer("reader")).content == data
    assert httpx.get(f"{auth_store.url}/v1/blobs/{digest}", headers=bearer("writer")).status_code == 200
    assert httpx.post(f"{auth_store.url}/v1/gc", headers=bearer("writer")).status_code == 403
    assert httpx.post(f"{auth_store.url}/v1/gc", headers=bearer("admin")).status_code == 200
    assert httpx.get(f"{auth_store.url}/healthz").status_code == 200


def test_open_store_refuses_non_loopback(tmp_path):
    import subprocess

    from support import VENV_BIN

    r = subprocess.run(
        [str(VENV_BIN / "mmstore"), "serve", "--host", "0.0.0.0", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(VENV_BIN)},
    )
    assert r.returncode == 2 and "refusing to bind" in r.stderr


def _progressive_with_scans(extra: int) -> bytes:
    """A progressive JPEG whose last scan comes ``extra`` more times (bytes surgery)."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(64, 48, seed=4))).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * extra + data[-2:]


def test_jpeg_with_too_many_scans_is_422_image_too_complex(store):
    assert put(store, _progressive_with_scans(20)).status_code == 201  # 30 scans: fine
    hostile = _progressive_with_scans(200)
    r = put(store, hostile)
    assert r.status_code == 422 and error_code(r) == "image_too_complex", r.text
    assert "scans" in r.json()["error"]["message"]
    assert httpx.get(f"{store.url}/v1/blobs/{compute_digest(hostile)}").status_code == 404


def test_jpeg_scans_that_end_early_are_422_not_stored_grey(store):
    """A truncated JPEG with an EOI appended, and a tiny JPEG whose header claims 3000x3000:
    libjpeg would fill the missing blocks with grey; the store refuses them."""
    data = image_bytes(200, 150, "JPEG", seed=11)
    truncated = data[: len(data) // 2] + b"\xff\xd9"
    bomb = bytearray(image_bytes(8, 8, "JPEG", seed=12))
    sof = bomb.index(b"\xff\xc0")
    bomb[sof + 5 : sof + 9] = (3000).to_bytes(2, "big") * 2
    for body in (truncated, bytes(bomb)):
        r = put(store, body)
        assert r.status_code == 422 and error_code(r) == "corrupt_image", r.text
        assert httpx.get(f"{store.url}/v1/blobs/{compute_digest(body)}").status_code == 404


def test_malformed_gif_and_tiff_answer_json_never_500(store):
    """Single-byte mutations that made PIL raise IndexError, TypeError, SyntaxError or KeyError
    (500 text/plain before). Broken later frames no longer matter (the rule reads the first frame
    only, so these are stored); a first frame PIL cannot decode is 422 corrupt_image."""
    frames = [Image.new("RGB", (6, 5), (i * 40, 255 - i * 40, 7)) for i in range(3)]
    files = {}
    for fmt in ("GIF", "TIFF"):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
        files[fmt] = buf.getvalue()
    cases = [("GIF", 52, 1, 201), ("TIFF", 8, 9, 201), ("TIFF", 248, 3, 201), ("TIFF", 288, 1, 201)]
    for fmt, pos, value, status in [*cases, ("TIFF", 72, 2, 422)]:
        data = bytearray(files[fmt])
        data[pos] = value
        r = put(store, bytes(data))
        assert r.status_code == status and r.headers["content-type"] == "application/json", (fmt, pos, r.text)
        if status == 422:
            assert error_code(r) == "corrupt_image"
        else:
            assert (r.json()["width"], r.json()["height"]) == (6, 5)


def test_mpo_jpeg_is_stored_as_a_jpeg(store):
    """Phone cameras add a multi-picture (MPF) segment; PIL calls such a JPEG "MPO"."""
    first, second = (Image.open(io.BytesIO(image_bytes(40, 30, seed=s))) for s in (21, 22))
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second])
    r = put(store, buf.getvalue())
    assert r.status_code == 201, r.text
    info = r.json()
    assert (info["mime"], info["format"], info["width"], info["height"]) == ("image/jpeg", "JPEG", 40, 30)
    assert httpx.get(f"{store.url}/v1/blobs/{info['digest']}").content == buf.getvalue()
