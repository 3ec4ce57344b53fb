from __future__ import annotations

import sys
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
