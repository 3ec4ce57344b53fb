"""Test support: real server processes on free loopback ports, and real image bytes."""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from mmstore_rollout.stack import Service, free_port
from PIL import Image

VENV_BIN = Path(sys.executable).parent


class ServerProcess:
    """A real service process (``argv``) on a free port, started by the test; once started, the
    stack's :class:`~mmstore_rollout.stack.Service` (own process group: stopping it also stops its
    children, vLLM's engine processes)."""

    def __init__(
        self,
        argv: list[str],
        port: int,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        health: str = "/healthz",  # vLLM's own server answers /health
    ):
        self.argv, self.port, self.log, self.health = argv, port, log, health
        self.env = {**os.environ, **(env or {})}
        self.url = f"http://127.0.0.1:{port}"
        self.service: Service | None = None

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.service.proc if self.service else None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.service = Service(Path(self.argv[0]).name, self.url, proc, self.log or Path(os.devnull))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.argv} exited with {proc.returncode}")
            try:
                if httpx.get(f"{self.url}{self.health}", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise TimeoutError(f"{self.argv} not healthy after {timeout}s")

    def kill(self) -> None:
        """SIGKILL: no cleanup, as a crash."""
        if self.service:
            self.service.kill()

    def stop(self) -> None:
        if self.service:
            self.service.stop(timeout=10)


# -- an S3-compatible server (moto's server mode), for the S3 backend's tests and benchmark ---------

# moto's server checks a conditional request (If-None-Match / If-Match) and then applies it in two
# steps, across threads; S3, MinIO and R2 apply each request atomically. This runs the same moto
# app under one lock, so the tests see S3's atomicity (which the backend's conditional writes rely on).
_MOTO_SERVER = """
import sys, threading
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()

def atomic(environ, start_response):
    with lock:
        return list(app(environ, start_response))

run_simple("127.0.0.1", int(sys.argv[1]), atomic, threaded=True, request_handler=MotoRequestHandler)
"""


class S3Server:
    """A moto S3 server process on a free loopback port; ``bucket()`` makes a fresh bucket."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }
        self.log = log
        self.proc = None
        self._buckets = 0

    def start(self, timeout: float = 60.0) -> S3Server:
        out = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _MOTO_SERVER, str(self.port)], stdout=out, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited, see {self.log}")
            try:
                httpx.get(f"{self.endpoint}/moto-api/", timeout=1)
                return self
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"moto server did not start, see {self.log}") from None
                time.sleep(0.1)

    @property
    def config(self) -> dict[str, str]:
        """obstore's S3 settings for this server (``S3Store(..., config=)``, ``S3Storage``)."""
        return {
            "endpoint": self.endpoint,
            "access_key_id": "testing",
            "secret_access_key": "testing",
            "region": "us-east-1",
        }

    def client(self):
        """A boto3 client on the server (to create buckets and to look inside them)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def bucket(self, prefix: str = "store") -> str:
        """A new empty bucket; its ``s3://bucket/prefix`` storage URL."""
        self._buckets += 1
        name = f"mmstore-test-{self._buckets}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}/{prefix}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def store_process(root: Path, *, tokens: str | None = None, **env: str) -> ServerProcess:
    port = free_port()
    extra = {"MMSTORE_TOKENS": tokens} if tokens else {}
    extra.update({f"MMSTORE_{k.upper()}": v for k, v in env.items()})
    mmstore = shutil.which("mmstore", path=str(VENV_BIN)) or "mmstore"
    return ServerProcess(
        [mmstore, "serve", "--port", str(port), "--root", str(root)],
        port,
        env=extra,
        log=root.parent / f"mmstore-{port}.log",
    )


def image_bytes(
    width: int = 64, height: int = 48, fmt: str = "PNG", seed: int = 0, mode: str = "RGB"
) -> bytes:
    """A real image whose pixels depend on ``seed`` (so seeds give different digests)."""
    img = Image.new(mode, (width, height))
    px = [
        ((x * 7 + seed * 31) % 256, (y * 5 + seed) % 256, (x + y + seed * 3) % 256)
        for y in range(height)
        for x in range(width)
    ]
    if mode == "RGB":
        img.putdata(px)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def noise_png(nbytes_target: int, seed: int = 0) -> bytes:
    """An incompressible PNG of about ``nbytes_target`` bytes (random pixels)."""
    side = max(8, int((nbytes_target / 3) ** 0.5))
    rnd = random.Random(seed).randbytes(side * side * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), rnd).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class FetchingRenderer:
    """The sans-I/O renderer with a header source beside it, as its callers use it: ``render`` and
    ``bridge`` first fetch the headers ``image_refs`` names through ``source.image_headers`` (a
    ``StoreClient``, or :class:`ImageSet` for images that never went to a store)."""

    def __init__(self, renderer, source) -> None:
        self.renderer, self.source = renderer, source

    def __getattr__(self, name: str):
        return getattr(self.renderer, name)

    def render(self, messages, **options):
        from mmstore_client.render import image_refs

        return self.renderer.render(messages, self.source.image_headers(image_refs(messages)), **options)

    def bridge(self, previous, new_messages, **options):
        from mmstore_client.render import image_refs

        headers = self.source.image_headers(image_refs(new_messages))
        return self.renderer.bridge(previous, new_messages, headers, **options)


class ImageSet(dict):
    """digest -> bytes standing in for a store: the headers the renderer asks for."""

    def image_headers(self, digests) -> dict:
        from mmstore_client import decode

        return {d: decode.probe(self[d]) for d in digests}
