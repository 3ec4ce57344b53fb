"""The wire form of decoded pixels, ``GET /v1/blobs/{digest}/pixels`` (the store's
:mod:`mmstore.pixels` keeps them from verifying uploads): the decoding rule's 8-bit RGB pixels,
rows top to bottom, width x height x 3 bytes, the size in two headers. A store that keeps no
pixels of the digest answers 404 with the code :data:`PIXELS_NOT_KEPT`: read the bytes instead.
It never keeps those of a format whose upload check is not a full decode (:func:`kept_format`).
"""

from __future__ import annotations

from collections.abc import Mapping

from PIL import Image

from .errors import ServerError

PIXEL_WIDTH = "mmstore-width"
PIXEL_HEIGHT = "mmstore-height"
PIXELS_NOT_KEPT = "pixels_not_kept"
# Formats whose upload check is not a full decode (JPEG: decode.check_pixels decodes it at 1/8
# scale in the DCT domain), so the store has no pixels of them to keep.
_FAST_CHECK_FORMATS = frozenset({"JPEG"})


def kept_format(fmt: str) -> bool:
    """Whether the store keeps the pixels of an upload of PIL format ``fmt`` (see
    :data:`mmstore_client.decode.FORMAT_MIME`)."""
    return fmt not in _FAST_CHECK_FORMATS


def image_from_wire(digest: str, headers: Mapping[str, str], content: bytes) -> Image.Image:
    """The RGB image of a pixels response; :class:`ServerError` if its size and length disagree."""
    try:
        width, height = int(headers[PIXEL_WIDTH]), int(headers[PIXEL_HEIGHT])
    except (KeyError, ValueError):
        width = height = 0
    if width <= 0 or height <= 0 or len(content) != width * height * 3:
        raise ServerError(
            502,
            "malformed_pixels",
            f"pixels of {digest}: {len(content)} bytes for a size of {width}x{height} (RGB, 3 bytes a pixel)",
            {"digest": digest},
        )
    return Image.frombytes("RGB", (width, height), content)
