"""Test support: real server processes on free loopback ports, and real image bytes."""

from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path

from mmstore_rollout.stack import BIN, Service, free_port, store_service
from PIL import Image

VENV_BIN = BIN  # the venv's entry points, for the tests' one-shot commands (mmstore fsck, ...)

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
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }
        argv = [sys.executable, "-c", _MOTO_SERVER, str(port)]
        self.service = Service("moto", argv, port, log, ready_path="/moto-api/", grace=10)
        self._buckets = 0

    def start(self, timeout: float = 60.0) -> S3Server:
        self.service.start(timeout)
        return self

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
        self.service.stop()


def store_env(tokens: str | None = None, **settings: str) -> dict[str, str]:
    """This environment with the store's ``MMSTORE_*`` settings (``workers="2"``) and tokens."""
    extra = {"MMSTORE_TOKENS": tokens} if tokens else {}
    return {**os.environ, **extra, **{f"MMSTORE_{k.upper()}": v for k, v in settings.items()}}


def store_process(
    root: Path, *, port: int | None = None, tokens: str | None = None, **settings: str
) -> Service:
    """``mmstore serve`` on ``root`` (unstarted; ``.start()`` waits for /healthz), its log beside it."""
    port = port or free_port()
    env = store_env(tokens, **settings)
    return store_service(root.parent, root=root, port=port, env=env, name=f"mmstore-{port}")


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
