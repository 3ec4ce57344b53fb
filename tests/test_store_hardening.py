"""The store under hostile input and hostile clients (issue 16): auth, validation, body and time
bounds, each against a real `mmstore serve` process on loopback."""

from __future__ import annotations

import subprocess

import httpx
import pytest
from mmstore_client.digest import compute_digest, is_digest
from support import VENV_BIN, image_bytes


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
