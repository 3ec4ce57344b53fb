"""Rollout-worker offload: replace every inline image in chat messages by an mmstore ref.

``offload_messages(messages, store, run)`` walks a message list or a whole request body
(``{"messages": [...]}``) with :func:`mmstore_client.parts.image_parts` (nested parts and tool
results included) and turns each ``data:image/...;base64,`` URL, local file
(``file://`` URL or path) and, if allowed, http(s) URL into ``mmstore://blobs/<digest>``.

Every image is read and its header checked before anything is uploaded (the store decodes
each one fully and its refusals are reported against the part too); the input is never
modified: a new structure is returned, or nothing. Identical images are uploaded once. Afterwards
nothing but refs remains (checked). Errors name the message and part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx

from . import decode
from .descriptor import reject_processed
from .digest import compute_digest, is_ref, make_ref
from .errors import RejectedError
from .parts import ImagePart, image_parts
from .store import AsyncStoreClient, StoreClient


class OffloadError(ValueError):
    """An image that cannot be offloaded; ``where`` names the message and part."""

    def __init__(self, where: str, message: str, code: str = "invalid_image") -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.code = code


@dataclass(frozen=True)
class OffloadPolicy:
    fetch_http: bool = False  # fetch http(s) image URLs and offload them (else refuse them)
    http_max_bytes: int = 32 << 20
    http_timeout: float = 10.0
    max_pixels: int = decode.DEFAULT_MAX_PIXELS
    # optional check of each image's size against a model layout (raises at offload time)
    check_size: Callable[[int, int], object] | None = None


def _read_local(url: str, where: str) -> bytes:
    path = Path(unquote(urlparse(url).path)) if url.startswith("file://") else Path(url)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise OffloadError(
            where, f"cannot read image file {str(path)!r}: {exc.strerror}", "unreadable_file"
        ) from exc


def _decode_data_uri(url: str, where: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().startswith("data:image/") or not head.lower().endswith(";base64"):
        raise OffloadError(
            where, f"malformed data URI (expected data:image/<type>;base64,...): {head[:60]!r}"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise OffloadError(where, f"data URI is not valid base64: {exc}") from exc


def _fetch_http(url: str, where: str, policy: OffloadPolicy) -> bytes:
    if not policy.fetch_http:
        raise OffloadError(where, f"http(s) image URLs are refused by policy: {url[:100]}", "url_refused")
    try:
        with httpx.stream("GET", url, timeout=policy.http_timeout, follow_redirects=True) as r:
            r.raise_for_status()
            body = bytearray()
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) > policy.http_max_bytes:
                    raise OffloadError(where, f"image at {url[:100]} exceeds {policy.http_max_bytes} bytes")
            return bytes(body)
    except httpx.HTTPError as exc:
        raise OffloadError(where, f"cannot fetch {url[:100]}: {exc}", "unreachable_url") from exc


def _load(site: ImagePart, policy: OffloadPolicy) -> tuple[bytes, decode.ImageHeader]:
    url = site.url
    if url.startswith("data:"):
        data = _decode_data_uri(url, site.where)
    elif url.startswith(("http://", "https://")):
        data = _fetch_http(url, site.where, policy)
    else:
        data = _read_local(url, site.where)
    try:
        header = decode.probe(data, max_pixels=policy.max_pixels)
    except decode.ImageError as exc:
        raise OffloadError(site.where, str(exc), exc.code) from exc
    if policy.check_size is not None:
        try:
            policy.check_size(header.width, header.height)
        except decode.ImageError as exc:
            raise OffloadError(site.where, str(exc), exc.code) from exc
    return data, header


@dataclass
class _Blob:
    data: bytes
    header: decode.ImageHeader
    where: str  # the first part that holds it, for errors the store reports


def plan_offload(body: Any, policy: OffloadPolicy) -> tuple[Any, dict[str, _Blob]]:
    """Read and check every inline image; return the rewritten copy and the unique blobs.

    Nothing is uploaded here and ``body`` is left untouched.
    """
    out = copy.deepcopy(body)
    blobs: dict[str, _Blob] = {}
    for site in image_parts(out):
        if is_ref(site.url):
            continue
        data, header = _load(site, policy)
        digest = compute_digest(data)
        blobs.setdefault(digest, _Blob(data, header, site.where))
        site.container[site.key] = make_ref(digest)
    for site in image_parts(out):
        if not is_ref(site.url):
            raise OffloadError(site.where, "an image URL is left that is not an mmstore ref")
    reject_processed(out)
    return out, blobs


def offload_messages(body: Any, store: StoreClient, run: str, policy: OffloadPolicy | None = None) -> Any:
    """Upload every inline image of ``body`` to ``store`` for ``run``; return the rewritten copy.

    One ``blobs:link`` call for all of them; only the blobs the store lacks are sent. Each image
    is then kept in ``store``'s caches (:meth:`StoreClient.keep_hashed`), so rendering and
    generating from the refs neither fetches nor probes it again."""
    out, blobs = plan_offload(body, policy or OffloadPolicy())
    if blobs:
        missing = store.link(run, list(blobs)).missing
        for digest in missing:
            blob = blobs[digest]
            try:
                store.put(blob.data, run)
            except RejectedError as exc:
                raise OffloadError(blob.where, exc.message, exc.code) from exc
        for digest, blob in blobs.items():
            store.keep_hashed(digest, blob.data, blob.header)
    return out


async def aoffload_messages(
    body: Any, store: AsyncStoreClient, run: str, policy: OffloadPolicy | None = None
) -> Any:
    """Async twin of :func:`offload_messages`; uploads concurrently.

    A chat request that carries its whole conversation inline sends every earlier image again:
    one link call for all of them (not one per image) keeps that to one round trip."""
    out, blobs = await asyncio.to_thread(plan_offload, body, policy or OffloadPolicy())

    async def put(blob: _Blob) -> None:
        try:
            await store.put(blob.data, run)
        except RejectedError as exc:
            raise OffloadError(blob.where, exc.message, exc.code) from exc

    if blobs:
        missing = (await store.link(run, list(blobs))).missing
        await asyncio.gather(*(put(blobs[digest]) for digest in missing))
        for digest, blob in blobs.items():
            store.keep_hashed(digest, blob.data, blob.header)
    return out
