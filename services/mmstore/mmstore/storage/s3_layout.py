"""Object keys of the S3 backend (under the bucket's prefix) and the small records kept there.

::

    blobs/<hex>                  the bytes, exactly as uploaded; BlobInfo in the object's metadata
                                 (Content-Type, x-amz-meta-mmstore-{format,width,height}), so HEAD
                                 and /info never download a blob
    guards/<hex>                 the blob's guard: live / condemned / deleting (see s3_guard.py)
    verified/<hex>               empty: some replica decoded these bytes and accepted them (or its
                                 caller had validated them); a blob without it is linked only after
                                 the linking replica has checked it itself
    refs/<hex>/<run>             empty: "run links this blob"; what GC lists to find live blobs
    links/<run>/<hex>.<info>     empty: the same link, listed per run in digest order; the key
                                 carries the BlobInfo, so one LIST answers a page of a run's blobs
    runs/<run>.json              the run's blob count, bytes and times (updated by compare-and-swap)
    quarantine/<hex>             blobs fsck found corrupt

Run ids never contain ``/`` (``mmstore_client.digest.RUN_ID_PATTERN``), so ``links/<run>/`` and
``refs/<hex>/`` prefixes never overlap between runs. Hex digests sort like the ``blake3:<hex>``
digests, so listing ``links/<run>/`` is the run's blobs in digest order.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from urllib.parse import quote, unquote

from mmstore_client.models import BlobInfo, RunInfo

BLOBS = "blobs/"
GUARDS = "guards/"
REFS = "refs/"
LINKS = "links/"
RUNS = "runs/"
QUARANTINE = "quarantine/"
VERIFIED = "verified/"

META_FORMAT = "mmstore-format"
META_WIDTH = "mmstore-width"
META_HEIGHT = "mmstore-height"


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix); ValueError naming the expected form."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise ValueError(
            f"unsupported storage {url!r}: use s3://bucket or s3://bucket/prefix "
            "(or leave it unset for the local directory root)"
        )
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


def blob_key(hexd: str) -> str:
    return BLOBS + hexd


def guard_key(hexd: str) -> str:
    return GUARDS + hexd


def verified_key(hexd: str) -> str:
    return VERIFIED + hexd


def ref_key(hexd: str, run: str) -> str:
    return f"{REFS}{hexd}/{run}"


def run_key(run: str) -> str:
    return f"{RUNS}{run}.json"


def link_prefix(run: str) -> str:
    return f"{LINKS}{run}/"


def link_key(run: str, info: BlobInfo) -> str:
    """``links/<run>/<hex>.<size>.<width>.<height>.<format>.<mime, %-quoted>``."""
    hexd = info.digest.split(":", 1)[1]
    return (
        f"{link_prefix(run)}{hexd}.{info.size}.{info.width}.{info.height}."
        f"{quote(info.format, safe='')}.{quote(info.mime, safe='')}"
    )


def parse_link(key: str) -> tuple[str, BlobInfo]:
    """The run and BlobInfo a link key stands for."""
    run, name = key[len(LINKS) :].split("/", 1)
    hexd, size, width, height, fmt, mime = name.split(".", 5)
    info = BlobInfo(
        digest=f"blake3:{hexd}",
        size=int(size),
        mime=unquote(mime),
        format=unquote(fmt),
        width=int(width),
        height=int(height),
    )
    return run, info


def link_offset(run: str, cursor: str) -> str:
    """The LIST ``start-after`` key for the page after ``cursor`` (digests compare as strings)."""
    if not cursor.startswith("blake3:"):
        # before every digest: from the start; after every digest ("~" > hex): nothing
        return link_prefix(run) + ("" if cursor < "blake3:" else "~")
    tail = cursor[len("blake3:") :]
    # "<hex>.~" sorts after the cursor's own key "<hex>.<size>..." (digits < "~") and before the
    # next digest's (not "<hex>/": object store paths drop a trailing "/")
    return link_prefix(run) + tail + (".~" if len(tail) >= 64 else "")


def blob_attributes(info: BlobInfo) -> dict[str, str]:
    return {
        "Content-Type": info.mime,
        META_FORMAT: info.format,
        META_WIDTH: str(info.width),
        META_HEIGHT: str(info.height),
    }


def blob_info(digest: str, size: int, attributes: dict[str, str]) -> BlobInfo:
    return BlobInfo(
        digest=digest,
        size=size,
        mime=attributes["Content-Type"],
        format=attributes[META_FORMAT],
        width=int(attributes[META_WIDTH]),
        height=int(attributes[META_HEIGHT]),
    )


@dataclass(slots=True)
class RunCounter:
    """``runs/<run>.json``: what GET /v1/runs/{run} answers with one small GET."""

    blob_count: int
    bytes: int
    created_at: float
    updated_at: float

    @classmethod
    def new(cls) -> RunCounter:
        now = time.time()
        return cls(0, 0, now, now)

    @classmethod
    def decode(cls, body: bytes) -> RunCounter:
        return cls(**json.loads(body))

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def info(self, run: str) -> RunInfo:
        return RunInfo(run=run, **asdict(self))
