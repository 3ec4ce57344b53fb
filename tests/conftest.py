from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mmstore_rollout.stack import Service, free_port, inference_service, store_service
from support import FetchingRenderer, S3Server, store_env, store_process

TOKENS = '{"reader": ["read"], "writer": ["write"], "admin": ["admin"]}'


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Service:
    """One real open (loopback) mmstore process for the session."""
    server = store_process(tmp_path_factory.mktemp("store") / "data").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def auth_store(tmp_path_factory) -> Service:
    """A real mmstore process with read / write / admin tokens."""
    server = store_process(tmp_path_factory.mktemp("authstore") / "data", tokens=TOKENS).start()
    yield server
    server.stop()


REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_qwen2_vl() -> Path:
    """The default tiny model, random-weight Qwen2-VL (built once into .cache/, not committed):
    the same folder ``make smoke`` and the benches serve."""
    from mmstore_trainer.tiny_model import ensure_default_tiny_model

    return ensure_default_tiny_model(REPO_ROOT)


@pytest.fixture(scope="session")
def tiny_qwen3_vl() -> Path:
    from mmstore_trainer.tiny_model import ensure_tiny_model, tiny_model_folder

    return ensure_tiny_model(tiny_model_folder("qwen3_vl", REPO_ROOT), "qwen3_vl")


CHAT_TEMPLATES = Path(__file__).resolve().parent / "data" / "chat_templates"


def tiny_with_template(family: str, template: str) -> Path:
    """A tiny ``family`` checkpoint carrying a real model's chat template (tests/data/chat_templates)."""
    import hashlib

    from mmstore_trainer.tiny_model import TOOLS_CHAT_TEMPLATE, ensure_tiny_model, tiny_model_folder

    # the instruct template ships with the trainer (the tool-using smoke loop builds on it)
    source = (
        TOOLS_CHAT_TEMPLATE if template == TOOLS_CHAT_TEMPLATE.stem else CHAT_TEMPLATES / f"{template}.jinja"
    )
    text = source.read_text()
    tag = hashlib.sha256(text.encode()).hexdigest()[:8]  # an edited template builds a new folder
    folder = tiny_model_folder(f"{family}-{template}-{tag}", REPO_ROOT)
    return ensure_tiny_model(folder, family, chat_template=text)


@pytest.fixture(scope="session")
def tiny_qwen3_vl_instruct() -> Path:
    """Tiny Qwen3-VL with the Qwen3-VL-Instruct chat template (tools, tool calls, tool images)."""
    return tiny_with_template("qwen3_vl", "qwen3_vl_instruct")


@pytest.fixture(scope="session")
def tiny_qwen3_vl_thinking() -> Path:
    """Tiny Qwen3-VL with the Qwen3-VL-Thinking chat template (<think> opened by the prompt)."""
    return tiny_with_template("qwen3_vl", "qwen3_vl_thinking")


def inference_process(model_dir: Path, store_url: str, log_dir: Path, **env: str) -> Service:
    """``mmstore-inference serve`` (unstarted) with the launcher's CPU engine settings."""
    # 24 images per prompt: the 20-turn agreement test carries 21
    env = {**os.environ, "MMSTORE_INFERENCE_MAX_IMAGES_PER_PROMPT": "24", **env}
    return inference_service(model_dir, store_url, log_dir, env=env)


@pytest.fixture(scope="session")
def inference(tiny_qwen2_vl, store, tmp_path_factory) -> Service:
    """One real `mmstore-inference serve` (vLLM CPU, tiny Qwen2-VL) for the session, on the store."""
    with ready_inference(tiny_qwen2_vl, store.url, tmp_path_factory.mktemp("inference")) as server:
        yield server


@contextlib.contextmanager
def ready_inference(model_dir: Path, store_url: str, log_dir: Path):
    """An inference process, once its engine is ready (/readyz); stopped on exit."""
    server = inference_process(model_dir, store_url, log_dir)
    try:
        yield server.start(timeout=900)
    finally:
        server.stop()


# -- the S3 backend: a real S3-compatible HTTP server (moto's server mode) -------------------------


def s3_store_process(s3: S3Server, url: str, log_dir: Path, *, tokens: str | None = None, **env: str):
    """``mmstore serve --storage s3://...`` against ``s3`` (the AWS_* variables point at it)."""
    port = free_port()
    env = {**store_env(tokens, **env), **s3.env}
    return store_service(log_dir, storage=url, port=port, env=env, name=f"mmstore-s3-{port}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_store(s3_server, tmp_path_factory) -> Service:
    """One real open (loopback) mmstore process on a bucket, for the session."""
    server = s3_store_process(s3_server, s3_server.bucket(), tmp_path_factory.mktemp("s3store")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_auth_store(s3_server, tmp_path_factory) -> Service:
    """An mmstore process on its own bucket with read / write / admin tokens."""
    log_dir = tmp_path_factory.mktemp("s3authstore")
    server = s3_store_process(s3_server, s3_server.bucket(), log_dir, tokens=TOKENS).start()
    yield server
    server.stop()


@pytest.fixture(scope="session", params=["local", "s3"])
def store_backend(request) -> str:
    """The backend a store API test runs on. test_store_api.py and test_store_client.py override
    ``store`` / ``auth_store`` with it (``s3_store`` / ``s3_auth_store`` for "s3"), so each of their
    tests runs once per backend while every other test file keeps the one local ``store``."""
    return request.param


@pytest.fixture(scope="module")
def parts(store, inference, tiny_qwen2_vl):
    """Every part of the data path on the real services: a store client, the renderer, an
    inference client and the trainer's materializer (strict about pixels)."""
    from mmstore_client import StoreClient
    from mmstore_client.inference import InferenceClient
    from mmstore_client.render import Renderer
    from mmstore_trainer.data import Materializer

    client = StoreClient(store.url)
    renderer = FetchingRenderer(Renderer.from_pretrained(tiny_qwen2_vl), client)
    with InferenceClient(inference.url) as inf:
        yield client, renderer, inf, Materializer.from_pretrained(tiny_qwen2_vl, client, strict_pixels=True)
    client.close()
