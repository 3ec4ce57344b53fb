"""Content digests and refs: the one identity of an image across every component; and run ids.

A digest is ``blake3:<64 lowercase hex>`` of the raw file bytes, exactly as uploaded.
A ref is the URI that stands for an image inside chat messages: ``mmstore://blobs/<digest>``.
It names no host, so a ref stays valid under any deployment (one store, many replicas,
a bucket): every reader resolves it against the store it is configured with.
A run id names the run that keeps blobs alive (:data:`RUN_ID_PATTERN`); the store refuses others,
and clients check theirs with the same rule before sending.
"""

from __future__ import annotations

import re

import blake3

ALGORITHM = "blake3"
REF_PREFIX = "mmstore://blobs/"

# matched with fullmatch: ``$`` would also match before a trailing newline
_DIGEST_RE = re.compile(r"blake3:[0-9a-f]{64}")


# anchored for pydantic's ``pattern`` (which searches); ``is_run_id`` matches it whole, so a
# trailing newline is refused too. No ``/``: run ids are path segments and bucket key prefixes.
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_RUN_ID_RE = re.compile(RUN_ID_PATTERN)


class InvalidDigest(ValueError):
    """A string that is not ``blake3:<64 lowercase hex>``."""


class InvalidRef(ValueError):
    """A string that is not ``mmstore://blobs/<digest>``."""


def compute_digest(data: bytes | bytearray | memoryview) -> str:
    """The digest of ``data``; blake3 releases the GIL and uses several threads for large inputs."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO) if len(data) > 1 << 20 else blake3.blake3()
    hasher.update(data)
    return f"{ALGORITHM}:{hasher.hexdigest()}"


class DigestHasher:
    """Incremental digest for streamed bodies (uploads and downloads)."""

    def __init__(self) -> None:
        self._hasher = blake3.blake3()
        self.size = 0

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        self._hasher.update(chunk)
        self.size += len(chunk)

    def digest(self) -> str:
        return f"{ALGORITHM}:{self._hasher.hexdigest()}"


def is_digest(value: str) -> bool:
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None


def is_run_id(value: str) -> bool:
    return isinstance(value, str) and _RUN_ID_RE.fullmatch(value) is not None


def validate_digest(value: str) -> str:
    """Return ``value`` if it is a well-formed digest, else raise :class:`InvalidDigest`."""
    if not is_digest(value):
        raise InvalidDigest(
            f"invalid digest {value!r}: expected 'blake3:' followed by 64 lowercase hex characters"
        )
    return value


def digest_hex(digest: str) -> str:
    """The 64 hex characters of a validated digest (used for storage paths)."""
    return validate_digest(digest).split(":", 1)[1]


def make_ref(digest: str) -> str:
    return REF_PREFIX + validate_digest(digest)


def is_ref(url: str) -> bool:
    return isinstance(url, str) and url.startswith(REF_PREFIX)


def parse_ref(ref: str) -> str:
    """The digest a ref stands for; raise :class:`InvalidRef` for anything else."""
    if not is_ref(ref):
        raise InvalidRef(f"not an mmstore ref: {ref[:80]!r} (expected {REF_PREFIX}blake3:<hex>)")
    digest = ref[len(REF_PREFIX) :]
    if not is_digest(digest):
        raise InvalidRef(f"mmstore ref with a malformed digest: {ref[:120]!r}")
    return digest
