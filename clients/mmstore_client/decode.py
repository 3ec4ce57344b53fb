"""The one decoding rule: how image bytes become RGB pixels, and how their size is read.

Renderer, inference and trainer all call these functions, so the three can never disagree on
the pixels or the size of an image.

The rule, decided once:

* Formats: PNG, JPEG, WebP, GIF, BMP, TIFF, recognised by content (never by a declared type).
* Orientation: EXIF orientation IS applied (``ImageOps.exif_transpose``). That is what a person
  looking at the photo sees and what vLLM's and transformers' own URL loaders do. The width and
  height of the oriented image are the image's size for every layout computation;
  :func:`probe` reads them from the header (a 90/270 degree orientation swaps them), without
  decoding pixels: for PNG only an ``eXIf`` chunk before the pixel data counts (as the PNG
  specification places it); for TIFF the result is PIL's (its decoder applies the orientation).
  The store's BlobInfo reports the raw header size (PIL's ``size``), without orientation.
* Frames: the first frame of a multi-frame file (GIF, APNG, WebP, TIFF).
* Modes: everything ends as 8-bit ``RGB``:
  - transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent index) is alpha-composited
    onto white (255, 255, 255), vLLM's default ``rgba_background_color``;
  - ``CMYK`` and ``YCbCr`` through PIL's own conversion;
  - 16-bit and 32-bit grayscale (``I;16*``, ``I``) scaled to 8 bits by their full range
    (value >> 8 for 16-bit), never clipped; ``F`` clipped to [0, 255];
  - ``1``, ``L``, ``P`` by PIL's conversion to ``RGB``.
"""

from __future__ import annotations

import io
import warnings
from typing import NamedTuple

from PIL import Image, ImageFile, UnidentifiedImageError

from . import headers

# Only these formats are images we accept; PIL's name -> the MIME type we serve.
FORMAT_MIME: dict[str, str] = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
MIME_FORMAT = {mime: fmt for fmt, mime in FORMAT_MIME.items()}
BACKGROUND = (255, 255, 255)
DEFAULT_MAX_PIXELS = 100_000_000  # decompression-bomb limit; configurable by callers

# Callers pass their own pixel limit; PIL's global bomb check must not fire first with a
# different rule (we check the header size ourselves before any decoding).
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_ORIENTATION_METADATA = ("exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif")
# EXIF orientation -> the transpose that displays the image upright (as ImageOps.exif_transpose)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(ValueError):
    """Base class of the decoding rule's refusals; ``code`` is the error code the services use."""

    code = "corrupt_image"


class UnsupportedImage(ImageError):
    """Bytes that are not an image of an accepted format."""

    code = "unsupported_media_type"


class CorruptImage(ImageError):
    """An accepted format, but truncated or undecodable."""

    code = "corrupt_image"


class ImageTooLarge(ImageError):
    """More pixels than the configured limit (decompression bombs)."""

    code = "image_too_large"


class ImageHeader(NamedTuple):
    """What the file header says, without decoding pixels (a tuple: built on every placement)."""

    format: str  # PIL's format name, e.g. "PNG"
    mime: str
    raw_width: int  # as stored (PIL's size), no orientation applied
    raw_height: int
    width: int  # after EXIF orientation: the size every layout uses
    height: int
    frames: int


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise UnsupportedImage("bytes are not a recognised image (PNG, JPEG, WebP, GIF, BMP, TIFF)") from exc
    except Exception as exc:  # PIL raises many types on hostile headers
        raise CorruptImage(f"unreadable image header: {exc}") from exc
    if img.format not in FORMAT_MIME:
        raise UnsupportedImage(
            f"image format {img.format} is not accepted (accepted: {', '.join(FORMAT_MIME)})"
        )
    return img


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) from the header alone.

    PNG keeps EXIF in an ``eXIf`` chunk; PIL's ``getexif()`` on a PNG decodes the whole image to
    look for one after the pixel data. The PNG specification puts ``eXIf`` before the first
    ``IDAT``, so only a chunk seen while opening (``info["exif"]``) counts, in :func:`probe` and
    in :func:`decode_rgb` alike.
    """
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = int(exif.get(_ORIENTATION_TAG, 1) or 1)
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def probe(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Read format and size from the header only (microseconds; no pixel decoding).

    Well-formed PNG and JPEG headers are read by :mod:`mmstore_client.headers`; everything else
    by PIL. Raises :class:`UnsupportedImage`, :class:`CorruptImage` or :class:`ImageTooLarge`.
    """
    fast = headers.read(data)
    if fast is not None:
        fmt, raw_w, raw_h, orientation = fast
        frames = 1
    else:
        img = _open(data)
        fmt, (raw_w, raw_h), frames = img.format, img.size, getattr(img, "n_frames", 1)
        # TIFF: PIL's libtiff decoder applies the orientation while loading without swapping the
        # stored width/height (checked against ImageOps.exif_transpose in the tests): TIFF keeps them.
        orientation = 1 if fmt == "TIFF" else _orientation(img)
    if raw_w <= 0 or raw_h <= 0:
        raise CorruptImage(f"image header gives an empty size {raw_w}x{raw_h}")
    if raw_w * raw_h > max_pixels:
        raise ImageTooLarge(
            f"image is {raw_w}x{raw_h} = {raw_w * raw_h} pixels, over the limit of {max_pixels}"
        )
    if orientation in _SWAPPING_ORIENTATIONS:  # fields: format, mime, raw size, upright size, frames
        return ImageHeader(fmt, FORMAT_MIME[fmt], raw_w, raw_h, raw_h, raw_w, frames)
    return ImageHeader(fmt, FORMAT_MIME[fmt], raw_w, raw_h, raw_w, raw_h, frames)


def verify(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Probe, then decode the first frame fully, so truncated or corrupt data is refused."""
    header = probe(data, max_pixels=max_pixels)
    check_pixels(data)
    return header


def check_pixels(data: bytes) -> None:
    """Decode the first frame fully; :class:`CorruptImage` if its data is truncated or corrupt.

    The second half of :func:`verify`, for callers that probed first (the probe enforces the
    pixel limit, so never call this on bytes :func:`probe` has not accepted).
    """
    img = _open(data)
    if img.format == "JPEG":
        # DCT-domain downscaling: every entropy-coded byte is still read (so truncation is
        # caught), but the inverse transform runs at 1/8 scale: several times faster.
        img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
    try:
        img.load()
    except MemoryError:
        raise  # the machine's trouble, not the image's: never reported as corrupt bytes
    except Exception as exc:
        raise CorruptImage(f"image data is truncated or corrupt: {exc}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded PIL image of any mode to 8-bit RGB under the rule above."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        import numpy as np

        arr = np.asarray(img)
        if mode == "I":
            arr = np.clip(arr, 0, 65535)
        arr8 = (arr.astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        import numpy as np

        arr8 = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    return img.convert("RGB")


def pixel_digest(img: Image.Image) -> str:
    """A digest of decoded pixels (mode, size and raw bytes): the inference service reports it
    for each image it handed vLLM and the trainer recomputes it, so both prove they saw the same
    pixels, not only the same file bytes."""
    import blake3

    hasher = blake3.blake3(f"{img.mode}:{img.width}x{img.height}:".encode())
    hasher.update(img.tobytes())
    return f"blake3:{hasher.hexdigest()}"


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> oriented, first-frame, 8-bit RGB image. The one rule; see the module docstring."""
    probe(data, max_pixels=max_pixels)
    img = _open(data)
    header_orientation = _orientation(img)
    try:
        img.seek(0)
        img.load()
    except Exception as exc:
        raise CorruptImage(f"image data is truncated or corrupt: {exc}") from exc
    # PNG: the header's eXIf only (see _orientation). Others: read after loading, as
    # ImageOps.exif_transpose does, because some decoders (libtiff) apply the orientation
    # themselves while loading and clear the tag.
    orientation = header_orientation if img.format == "PNG" else _orientation(img)
    if orientation in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[orientation])
    rgb = to_rgb(img)
    if rgb is img:
        rgb = img.copy()
    # The pixels are upright now: drop the metadata that says otherwise, or a consumer that
    # applies EXIF orientation itself (vLLM's normalize_image does) would rotate them again.
    for key in _ORIENTATION_METADATA:
        rgb.info.pop(key, None)
    return rgb
