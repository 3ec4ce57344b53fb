"""Serving a blob's bytes (GET/HEAD ``/v1/blobs/{digest}``): one implementation.

Blobs are immutable and content-addressed, so the ETag is the digest, caches may keep a
response forever, and the ``digest -> (size, mime)`` lookup is cached in memory
(:class:`InfoCache`). A collected blob shows up as a missing file on GET and is evicted; a
HEAD or a 304, which read no bytes, check first that the blob is still stored (a stat locally).
A ``remote`` backend (a bucket) is looked up with async requests and its bytes are streamed chunk
by chunk (``BlobReply.stream``), so neither a slow bucket nor a large blob holds the event loop or
memory; local reads are unchanged. Such a backend may instead answer large GETs with a redirect to
a presigned URL of the bucket (``redirect_min_bytes``), as OCI registries do: the bytes then skip
the replica.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
from mmstore_client.models import BlobInfo

from .deps import checked_digest
from .errors import NotFoundError, RangeNotSatisfiable
from .storage.base import Storage

CACHE_CONTROL = "public, max-age=31536000, immutable"
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")  # fullmatch: ``$`` also matches before a newline
# A position of more digits than this is past any blob (and int() refuses 4,300+ digits).
_MAX_POSITION_DIGITS = 19
_INLINE_READ = 1 << 20  # smaller files are read on the event loop (page-cache reads are ~us)


@dataclass(slots=True)
class BlobReply:
    status: int
    headers: dict[str, str]
    body: bytes
    stream: AsyncIterator[bytes] | None = None  # remote backends: the body as chunks (body is b"")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_inclusive)`` for one satisfiable byte range; None: serve the whole blob.

    Malformed or multi-range headers are ignored (RFC 9110 allows serving 200); a well-formed
    range that starts past the end raises 416.
    """
    if not header:
        return None
    m = _RANGE_RE.fullmatch(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = _position(m.group(1)), _position(m.group(2))
    if first is not None:
        start = first
        end = min(last, size - 1) if last is not None else size - 1
        if last is not None and last < start:
            return None
    else:  # suffix range: the last N bytes
        n = last
        if n == 0:
            raise RangeNotSatisfiable("empty suffix range", size=size)
        start, end = max(0, size - n), size - 1
    if start >= size:
        raise RangeNotSatisfiable(f"range starts at {start}, blob has {size} bytes", size=size)
    return start, end


def _position(digits: str) -> int | None:
    """A range position; one too long to be a position in any blob reads as 2**64."""
    if not digits:
        return None
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_POSITION_DIGITS else 1 << 64


class InfoCache:
    """``digest -> (size, mime)`` for GET/HEAD: bounded, and costing the garbage collector nothing.

    Each entry is a str and an int (the size shifted left 8 bits, or-ed with an index into the few
    mime types seen), so the dicts hold no object the collector tracks and CPython leaves the dicts
    themselves untracked: a full collection does not walk the cache. (100k cached BlobInfo models
    were 300k tracked objects: a pause of about 100 ms in every full collection.) Two generations
    bound it: when the newer holds half the entries it becomes the older and the older is dropped;
    a hit in the older moves the entry up. Every operation O(1), no per-entry links.
    """

    def __init__(self, entries: int) -> None:
        self._half = (entries + 1) // 2
        self._new: dict[str, int] = {}
        self._old: dict[str, int] = {}
        self._mimes: list[str] = []
        self._mime_ids: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._new) + len(self._old)

    def get(self, digest: str) -> tuple[int, str] | None:
        packed = self._new.get(digest)
        if packed is None:
            packed = self._old.pop(digest, None)
            if packed is None:
                return None
            self._keep(digest, packed)
        return packed >> 8, self._mimes[packed & 0xFF]

    def add(self, digest: str, size: int, mime: str) -> None:
        mime_id = self._mime_ids.get(mime)
        if mime_id is None:
            if len(self._mimes) == 256:  # the store answers a handful of types: never reached
                return
            mime_id = self._mime_ids[mime] = len(self._mimes)
            self._mimes.append(mime)
        if self._half:
            self._keep(digest, size << 8 | mime_id)

    def discard(self, digest: str) -> None:
        self._new.pop(digest, None)
        self._old.pop(digest, None)

    def _keep(self, digest: str, packed: int) -> None:
        self._new[digest] = packed
        if len(self._new) >= self._half:
            self._old, self._new = self._new, {}


class BlobReader:
    def __init__(
        self,
        storage: Storage,
        cache_entries: int,
        *,
        redirect_min_bytes: int | None = None,
        redirect_ttl_seconds: int = 300,
    ) -> None:
        """``redirect_min_bytes`` (remote backends that presign): GETs of blobs at least this large
        answer 307 to a presigned URL of the bucket instead of streaming the bytes."""
        self.storage = storage
        self._cache = InfoCache(cache_entries)
        self._redirect_min = redirect_min_bytes
        self._redirect_ttl = redirect_ttl_seconds

    def _remember(self, digest: str, info: BlobInfo | None) -> tuple[int, str]:
        if info is None:
            raise NotFoundError(f"blob {digest} not found", digest=digest)
        self._cache.add(digest, info.size, info.mime)
        return info.size, info.mime

    def _gone(self, digest: str) -> NotFoundError:
        self._cache.discard(digest)
        return NotFoundError(f"blob {digest} not found", digest=digest)

    async def _lookup(self, digest: str, *, fresh: bool) -> tuple[int, str]:
        """``(size, mime)``; ``fresh``: the answer reads no bytes (HEAD, 304), so a cached entry is
        confirmed against the storage first (GC may have deleted the blob since)."""
        cached = self._cache.get(digest)
        if self.storage.remote:
            if cached is None or fresh:
                return self._remember(digest, await self.storage.info_async(digest))
            return cached
        if cached is None:
            cached = self._remember(digest, self.storage.info(digest))
        if fresh and not self.storage.exists(digest):
            raise self._gone(digest)
        return cached

    async def stored(self, digest: str) -> bool:
        """Whether the blob is stored now (confirmed against the storage: GC may have removed it)."""
        try:
            await self._lookup(digest, fresh=True)
        except NotFoundError:
            return False
        return True

    async def read(
        self,
        digest: str,
        *,
        head: bool,
        range_header: str | None,
        if_none_match: str | None,
        redirect: bool = True,
    ) -> BlobReply:
        """The reply to a GET/HEAD; ``redirect`` False: never a 307 (the bytes come through us)."""
        checked_digest(digest)  # the fast path calls this before any route's dependency could
        etag = f'"{digest}"'
        not_modified = bool(if_none_match) and (if_none_match.strip() == "*" or etag in if_none_match)
        size, mime = await self._lookup(digest, fresh=head or not_modified)
        headers = {"etag": etag, "cache-control": CACHE_CONTROL, "accept-ranges": "bytes"}
        if not_modified:
            return BlobReply(304, headers, b"")
        headers["content-type"] = mime
        byte_range = parse_range(range_header, size)
        start, end = byte_range or (0, size - 1)
        length = end - start + 1
        headers["content-length"] = str(length)
        status = 200
        if byte_range:
            status = 206
            headers["content-range"] = f"bytes {start}-{end}/{size}"
        if head:
            return BlobReply(status, headers, b"")
        if redirect and self._redirect_min is not None and size >= self._redirect_min:
            # the client's Range (if any) goes along to the bucket; the URL expires, so no caching
            location = await self.storage.presign(digest, self._redirect_ttl)
            return BlobReply(
                307, {"location": location, "cache-control": "no-store", "content-length": "0"}, b""
            )
        if self.storage.remote:
            return BlobReply(status, headers, b"", await self._open_stream(digest, start, length))
        body = await self._read(digest, start, length, size)
        return BlobReply(status, headers, body)

    async def _open_stream(self, digest: str, start: int, length: int) -> AsyncIterator[bytes]:
        try:
            return await self.storage.open_stream(digest, start, length)
        except FileNotFoundError:
            raise self._gone(digest) from None

    async def _read(self, digest: str, start: int, length: int, size: int) -> bytes:
        def read() -> bytes:
            return self.storage.read(digest, start, length)

        try:
            return read() if size <= _INLINE_READ else await anyio.to_thread.run_sync(read)
        except FileNotFoundError:
            raise self._gone(digest) from None
