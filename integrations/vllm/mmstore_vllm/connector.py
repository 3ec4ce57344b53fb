"""The ``mmstore`` media connector: vLLM's default connector plus ``mmstore://`` image refs.

``VLLM_MEDIA_CONNECTOR=mmstore`` makes vLLM build this class for every request that carries media
(chat ``image_url`` parts, ``/inference/v1/generate`` ``content_parts``, offline ``LLM.chat``).
A ref ``mmstore://blobs/blake3:<hex>`` is resolved by :mod:`mmstore_vllm.resolve`: fetched from
the store, blake3-verified, decoded by mmstore's one decoding rule, so vLLM's pixels are the
pixels the trainer materializes. Every other URL (http, data, file) goes to vLLM's own
``MediaConnector`` unchanged, with the server's ``--allowed-media-domains`` and
``--allowed-local-media-path``.

What vLLM hashes: the image is handed over as ``MediaWithBytes`` whose ``original_bytes`` is
``b"mmstore:" + digest``. vLLM's processor cache keys images by those bytes; the digest already
is the blake3 of the file (verified), so hashing 79 bytes replaces hashing megabytes per image
per request, and the prefix keeps the key apart from a data URL of the same file, which vLLM's
own loader decodes by its own rule (a different rule must never share a cache entry).
"""

from __future__ import annotations

from typing import Any

from PIL import Image
from vllm.multimodal.media import MediaConnector, MediaWithBytes

from . import compat
from .resolve import RefError, RefRejected, resolver

REF_SCHEME = "mmstore:"


class MmstoreMediaConnector(MediaConnector):
    def fetch_image(self, image_url: str, **kwargs: Any) -> Image.Image:
        if not image_url.startswith(REF_SCHEME):
            return super().fetch_image(image_url, **kwargs)
        try:
            return _media(*resolver().image(image_url))
        except RefError as exc:
            raise _vllm_error(exc, image_url) from None

    async def fetch_image_async(self, image_url: str, **kwargs: Any) -> Image.Image:
        if not image_url.startswith(REF_SCHEME):
            return await super().fetch_image_async(image_url, **kwargs)
        try:
            return _media(*await resolver().image_async(image_url))
        except RefError as exc:
            raise _vllm_error(exc, image_url) from None


def _media(digest: str, img: Image.Image) -> Image.Image:
    return MediaWithBytes(img, (REF_SCHEME + digest).encode())  # type: ignore[return-value]


def _vllm_error(exc: RefError, url: str) -> Exception:
    message = f"[{exc.code}] {exc}"
    if isinstance(exc, RefRejected):
        return compat.unprocessable(message, url[:120])
    return compat.StoreUnavailableError(message)
