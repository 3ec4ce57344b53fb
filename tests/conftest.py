from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support import ServerProcess, store_process

TOKENS = '{"reader": ["read"], "writer": ["write"], "admin": ["admin"]}'


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> ServerProcess:
    """One real open (loopback) mmstore process for the session."""
    server = store_process(tmp_path_factory.mktemp("store") / "data").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def auth_store(tmp_path_factory) -> ServerProcess:
    """A real mmstore process with read / write / admin tokens."""
    server = store_process(tmp_path_factory.mktemp("authstore") / "data", tokens=TOKENS).start()
    yield server
    server.stop()


TINY_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "tiny-models"


@pytest.fixture(scope="session")
def tiny_qwen2_vl() -> Path:
    """The tiny random-weight Qwen2-VL checkpoint (built once into .cache/, not committed)."""
    from mmstore_trainer.tiny_model import ensure_tiny_model

    return ensure_tiny_model(TINY_CACHE / "qwen2_vl", "qwen2_vl")


@pytest.fixture(scope="session")
def tiny_qwen3_vl() -> Path:
    from mmstore_trainer.tiny_model import ensure_tiny_model

    return ensure_tiny_model(TINY_CACHE / "qwen3_vl", "qwen3_vl")


def inference_process(model_dir: Path, store_url: str, log_dir: Path, **env: str) -> ServerProcess:
    from support import VENV_BIN, free_port

    port = free_port()
    return ServerProcess(
        [
            str(VENV_BIN / "mmstore-inference"),
            "serve",
            "--model",
            str(model_dir),
            "--store",
            store_url,
            "--port",
            str(port),
            "--enforce-eager",
            "--gpu-memory-utilization",
            "0.1",
            "--max-model-len",
            "4096",
        ],
        port,
        env={"VLLM_CPU_KVCACHE_SPACE": "1", **env},
        log=log_dir / f"inference-{port}.log",
    )


@pytest.fixture(scope="session")
def inference(tiny_qwen2_vl, store, tmp_path_factory) -> ServerProcess:
    """One real `mmstore-inference serve` (vLLM CPU, tiny Qwen2-VL) for the session, on the store."""
    import httpx

    server = inference_process(tiny_qwen2_vl, store.url, tmp_path_factory.mktemp("inference")).start(
        timeout=300
    )
    deadline = time.monotonic() + 400
    while httpx.get(f"{server.url}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "inference engine not ready"
        assert server.proc.poll() is None, f"inference exited, see {server.log}"
        time.sleep(1)
    yield server
    server.stop()
