"""The store under hostile input and hostile clients (issue 16): auth, validation, body and time
bounds, each against a real `mmstore serve` process on loopback."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from mmstore_client.digest import compute_digest, is_digest
from support import VENV_BIN, image_bytes, store_process


# As in test_store_api.py: tests taking `store` / `auth_store` run once per storage backend.
@pytest.fixture(scope="session")
def store(store, store_backend, request):
    return store if store_backend == "local" else request.getfixturevalue("s3_store")


@pytest.fixture(scope="session")
def auth_store(auth_store, store_backend, request):
    return auth_store if store_backend == "local" else request.getfixturevalue("s3_auth_store")


# -- tokens ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", ['{"": ["admin"]}', '{" ": ["read"]}', '{"\\u00a0": ["admin"]}'])
def test_blank_token_refused_at_startup(tmp_path, tokens):
    r = subprocess.run(
        [str(VENV_BIN / "mmstore"), "serve", "--host", "0.0.0.0", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(VENV_BIN), "MMSTORE_TOKENS": tokens},
    )
    assert r.returncode == 2, r.stderr
    assert "empty or has surrounding whitespace" in " ".join(r.stderr.split())


def test_blank_token_in_tokens_file_refused_at_startup(tmp_path):
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text('{"good": ["read"], "": ["admin"]}')
    r = subprocess.run(
        [str(VENV_BIN / "mmstore"), "serve", "--root", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(VENV_BIN), "MMSTORE_TOKENS_FILE": str(tokens_file)},
    )
    assert r.returncode == 2 and "empty or has surrounding whitespace" in " ".join(r.stderr.split())


@pytest.mark.parametrize("header", ["Bearer ", "Bearer \u00a0", "bearer    "])
def test_empty_bearer_never_matches(header):
    """Even with a blank token configured (which start-up refuses), a blank presented one is 401."""
    from mmstore.auth import Authorizer
    from mmstore.errors import UnauthorizedError

    with pytest.raises(UnauthorizedError):
        Authorizer({"": {"admin"}, "\u00a0": {"admin"}}).check(header, "admin")


# -- validation --------------------------------------------------------------------------------


def test_digest_with_trailing_newline_is_not_a_digest():
    digest = compute_digest(b"x")
    assert is_digest(digest) and not is_digest(digest + "\n")


def test_inference_settings_take_the_stores_run_id_rule():
    """The inference service refuses, at start-up, an offload run the store would refuse."""
    from mmstore_client.digest import is_run_id
    from mmstore_inference.settings import InferenceSettings
    from pydantic import ValidationError

    for run in ("ok", "a" * 128, "-bad", "a" * 129, "x\n", "a/b", ""):
        try:
            InferenceSettings(model="m", offload_run=run)
        except ValidationError:
            accepted = False
        else:
            accepted = True
        assert accepted == is_run_id(run), run
    assert is_run_id("ok") and not is_run_id("x\n")


def test_run_id_with_trailing_newline_is_400(store):
    data = image_bytes(seed=1601)
    r = httpx.put(f"{store.url}/v1/runs/x%0A/blobs/{compute_digest(data)}", content=data)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_run"
    runs = [run["run"] for run in httpx.get(f"{store.url}/v1/runs").json()["runs"]]
    assert "x\n" not in runs


def test_digest_with_trailing_newline_is_400(store):
    data = image_bytes(seed=1602)
    digest = compute_digest(data)
    r = httpx.put(f"{store.url}/v1/runs/r/blobs/{digest}%0A", content=data)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_digest"
    r = httpx.get(f"{store.url}/v1/blobs/{digest}%0A")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_digest"


def test_range_with_huge_numbers(store):
    data = image_bytes(seed=1603)
    digest = compute_digest(data)
    assert httpx.put(f"{store.url}/v1/runs/r/blobs/{digest}", content=data).status_code in (200, 201)
    url = f"{store.url}/v1/blobs/{digest}"
    huge = "9" * 5000
    r = httpx.get(url, headers={"range": f"bytes={huge}-"})
    assert r.status_code == 416 and r.json()["error"]["code"] == "range_not_satisfiable"
    r = httpx.get(url, headers={"range": f"bytes=1-{huge}"})
    assert r.status_code == 206 and r.content == data[1:]
    r = httpx.get(url, headers={"range": f"bytes=-{huge}"})
    assert r.status_code == 206 and r.content == data
    r = httpx.get(url, headers={"range": f"bytes={'0' * 5000}1-2"})
    assert r.status_code == 206 and r.content == data[1:3]


# -- bodies: read only after auth, always bounded -------------------------------------------------


def send_head(port: int, head: str, body: bytes = b"", timeout: float = 10.0) -> socket.socket:
    """A raw connection that sent ``head`` (CRLF line ends added) and ``body``, then stalls."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(head.replace("\n", "\r\n").encode() + body)
    return sock


def response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The response on ``sock`` (socket.timeout if none comes within the socket's timeout)."""
    r = http.client.HTTPResponse(sock)
    r.begin()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (whatever it sends first is read)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


JSON_ROUTES = ["/v1/gc", "/v1/blobs:missing", "/v1/runs/r/blobs:link"]


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_anonymous_json_body_refused_before_it_is_read(auth_store, path):
    """401 comes while the (declared 50 MB) body is still unsent: nothing of it was awaited."""
    head = f"POST {path} HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: 50000000\n\n"
    sock = send_head(auth_store.port, head, b'{"digests": [' + b'"x",' * 256)
    with sock:
        status, _, body = response(sock)
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"


def test_login_body_is_bounded(auth_store):
    head = "POST /ui/login HTTP/1.1\nHost: x\nContent-Type: application/x-www-form-urlencoded\n"
    sock = send_head(auth_store.port, head + "Content-Length: 400000000\n\n", b"token=" + b"a" * 1000)
    with sock:
        status, headers, body = response(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    assert headers["connection"] == "close"


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_json_body_over_limit_is_413(auth_store, path):
    def chunks():  # no Content-Length: the bound holds while the body streams
        yield b'{"digests": ['
        for _ in range(40_000):  # 3 MB, over the default 2 MiB
            yield b'"blake3:' + b"0" * 64 + b'",\n'
        yield b"]}"

    r = httpx.post(f"{auth_store.url}{path}", content=chunks(), headers={"authorization": "Bearer admin"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_json_routes_still_parse_and_validate(auth_store):
    admin = {"authorization": "Bearer admin"}
    r = httpx.post(f"{auth_store.url}/v1/blobs:missing", json={"digests": []}, headers=admin)
    assert r.status_code == 200 and r.json() == {"missing": []}
    r = httpx.post(f"{auth_store.url}/v1/blobs:missing", content=b"{not json", headers=admin)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    r = httpx.post(f"{auth_store.url}/v1/gc", json={"grace_seconds": -1}, headers=admin)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    assert httpx.post(f"{auth_store.url}/v1/gc", headers=admin).status_code == 200


# -- time bounds: head, body, idle ----------------------------------------------------------------


@pytest.fixture(scope="module")
def timed_store(tmp_path_factory):
    """A store with 1-second head, body and keep-alive bounds."""
    server = store_process(
        tmp_path_factory.mktemp("timed") / "data",
        head_timeout_seconds="1",
        body_timeout_seconds="1",
        keepalive_timeout_seconds="1",
    ).start()
    yield server
    server.stop()


def test_silent_connection_is_closed(timed_store):
    with socket.create_connection(("127.0.0.1", timed_store.port)) as sock:
        assert closed_within(sock, 8)


def test_trickled_head_is_closed(timed_store):
    """A slowloris: one header byte every 0.2 s keeps the connection busy, not open."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    with socket.create_connection(("127.0.0.1", timed_store.port), timeout=1) as sock:
        started = time.monotonic()
        with pytest.raises(OSError):  # BrokenPipe / ConnectionReset once the server closed it
            for byte in head:
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
                if time.monotonic() - started > 8:
                    break
            if not closed_within(sock, 0.5):
                pytest.fail("the connection is still open after 8 s of trickled headers")
            raise OSError("closed")  # closed_within saw the close


def test_stalled_body_is_408_and_closed(timed_store):
    data = image_bytes(seed=1604)
    head = f"PUT /v1/runs/r/blobs/{compute_digest(data)} HTTP/1.1\nHost: x\nContent-Length: {len(data)}\n\n"
    with send_head(timed_store.port, head, data[:-1]) as sock:
        status, headers, body = response(sock)
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        assert headers["connection"] == "close" and closed_within(sock, 5)
    assert httpx.get(f"{timed_store.url}/v1/blobs/{compute_digest(data)}").status_code == 404


def test_idle_keepalive_connection_is_closed(timed_store):
    with send_head(timed_store.port, "GET /healthz HTTP/1.1\nHost: x\n\n") as sock:
        assert response(sock)[0] == 200
        assert closed_within(sock, 3)  # uvicorn's default is 5 s


def test_slow_steady_body_is_not_cut(timed_store):
    """The body bound is between reads: a body that keeps coming, slower than the bound in
    total, is stored."""
    data = image_bytes(seed=1605)
    digest = compute_digest(data)

    def chunks():
        step = len(data) // 4 + 1
        for i in range(0, len(data), step):
            time.sleep(0.4)
            yield data[i : i + step]

    r = httpx.put(f"{timed_store.url}/v1/runs/r/blobs/{digest}", content=chunks())
    assert r.status_code == 201, r.text


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_stalled_uploads_do_not_hold_their_bytes(store):
    """6 uploads stalled one byte short of 20 MB: the server's memory does not hold 120 MB."""
    if store.proc is None or not Path(f"/proc/{store.proc.pid}").exists():
        pytest.skip("needs the server's /proc entry")
    size, uploads = 20 << 20, 6
    payload = bytes(size - 1)
    before = rss_bytes(store.proc.pid)
    socks = []
    try:
        for i in range(uploads):
            head = f"POST /v1/runs/r{i}/blobs HTTP/1.1\nHost: x\nContent-Length: {size}\n\n"
            socks.append(send_head(store.port, head, payload, timeout=30))
        time.sleep(2)  # the server has read what the kernel took
        grown = rss_bytes(store.proc.pid) - before
    finally:
        for sock in socks:
            sock.close()
    assert grown < size * uploads / 4, f"server grew {grown / 1e6:.0f} MB"


# -- metrics: counts are counters ------------------------------------------------------------------


def test_the_smoke_runs_store_counters_read_what_the_store_exports(store):
    """rollout's smoke run reads the store's counters by the names the store exports (one list)."""
    from mmstore_rollout.service_metrics import service_counters

    data = image_bytes(40, 30, seed=1607)
    url = f"{store.url}/v1/runs/names/blobs/{compute_digest(data)}"
    before, _ = service_counters(store.url, [])
    for _ in range(2):  # stored, then deduplicated
        assert httpx.put(url, content=data).status_code in (200, 201)
    assert httpx.get(f"{store.url}/v1/blobs/{compute_digest(data)}").content == data
    after, _ = service_counters(store.url, [])
    change = {k: after[k] - before[k] for k in after}
    assert change == {
        "blobs_created": 1,
        "uploads_deduplicated": 1,
        "bytes_in": 2 * len(data),
        "bytes_out": len(data),
    }


def test_store_counts_are_counters_with_total(store):
    """Every monotonic count the store exports is a counter (``_total``: ``rate()`` works on it),
    the viewer's thumbnail cache hits and misses included; no gauge holds a count."""
    from prometheus_client.parser import text_string_to_metric_families

    data = image_bytes(80, 60, seed=1606)
    digest = compute_digest(data)
    assert httpx.put(f"{store.url}/v1/runs/r/blobs/{digest}", content=data).status_code in (200, 201)
    for _ in range(2):
        assert httpx.get(f"{store.url}/ui/thumbs/{digest}?size=128", timeout=30).status_code == 200
    families = {
        f.name: f
        for f in text_string_to_metric_families(httpx.get(f"{store.url}/metrics").text)
        if f.name.startswith("mmstore_")
    }
    # (prometheus_client's ``<name>_created`` series are creation timestamps: gauges by design)
    counts = {n: f for n, f in families.items() if not n.endswith("_created")}
    assert {f.type for f in counts.values()} <= {"counter", "histogram"}
    for what in ("hits", "misses", "evictions"):
        family = families[f"mmstore_ui_thumbnail_cache_{what}"]
        assert family.type == "counter"
        assert [s.name for s in family.samples] == [f"mmstore_ui_thumbnail_cache_{what}_total"]
    value = {w: families[f"mmstore_ui_thumbnail_cache_{w}"].samples[0].value for w in ("hits", "misses")}
    assert value["hits"] >= 1 and value["misses"] >= 1
