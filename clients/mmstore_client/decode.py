"""The one decoding rule: how image bytes become RGB pixels, and how their size is read.

Renderer, inference and trainer all call these functions, so the three can never disagree on
the pixels or the size of an image.

The rule, decided once:

* Formats: PNG, JPEG, WebP, GIF, BMP, TIFF, recognised by content (never by a declared type).
  A JPEG with a multi-picture segment (MPO, as phone cameras write) is a JPEG: its first picture,
  the one every JPEG viewer shows (PIL's frame 0); its format is "JPEG", its MIME image/jpeg.
* Orientation: EXIF orientation IS applied (``ImageOps.exif_transpose``). That is what a person
  looking at the photo sees, and what these loaders do too (``tests/test_decode.py`` checks each
  claim against the installed libraries): vLLM's ``normalize_image`` (its media connector), and
  transformers' ``image_utils.load_image`` (PIL backend: pipelines and the PIL image processors'
  ``fetch_images``). transformers' torchvision backend does NOT when handed a path, URL or base64
  string: ``load_image_as_tensor`` decodes those with ``torchvision.io.decode_image``, raw pixels,
  so orientations 2-8 disagree with the rule (it applies it only to PIL images). Our services hand
  every library decoded images (:func:`decode_rgb`), never paths. The width and
  height of the oriented image are the image's size for every layout computation;
  :func:`probe` reads them from the header (a 90/270 degree orientation swaps them), without
  decoding pixels: for PNG only an ``eXIf`` chunk before the pixel data counts (as the PNG
  specification places it); for TIFF the result is PIL's (its decoder applies the orientation).
  The store's BlobInfo reports the raw header size (PIL's ``size``), without orientation.
* Frames: the first frame of a multi-frame file (GIF, APNG, WebP, TIFF, MPO); later frames are
  never read or counted.
* Refused (:class:`ImageError`, whose ``code`` the services answer): not an accepted format;
  truncated or undecodable data (libjpeg's grey fill of a scan that ends early counts as
  truncated: see :mod:`mmstore_client.jpeg_scans`); more pixels than ``max_pixels``; a JPEG of
  more scans than ``max_jpeg_scans``. Any failure of PIL on the bytes is one of these, never
  another exception; MemoryError stays MemoryError (the machine's trouble, not the image's).
* Modes: everything ends as 8-bit ``RGB``:
  - transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent index) is alpha-composited
    onto white (255, 255, 255), vLLM's default ``rgba_background_color``;
  - ``CMYK`` and ``YCbCr`` through PIL's own conversion;
  - 16-bit and 32-bit grayscale (``I;16*``, ``I``) scaled to 8 bits by their full range
    (value >> 8 for 16-bit), never clipped; ``F`` clipped to [0, 255];
  - ``1``, ``L``, ``P`` by PIL's conversion to ``RGB``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from typing import NamedTuple

from PIL import Image, ImageFile, UnidentifiedImageError

from . import headers, jpeg_scans

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
# PIL names a JPEG with a multi-picture (MPF) segment "MPO"; it is a JPEG (its first picture).
_FORMAT_ALIASES = {"MPO": "JPEG"}
BACKGROUND = (255, 255, 255)
DEFAULT_MAX_PIXELS = 100_000_000  # decompression-bomb limit; configurable by callers
# Encoders write 10 (libjpeg) to about 20 (mozjpeg) scans; each costs a pass over its blocks.
DEFAULT_MAX_JPEG_SCANS = 100

# Callers pass their own pixel limit; PIL's global bomb check must not fire first with a
# different rule (we check the header size ourselves before any decoding).
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

# libjpeg-turbo reads up to 57 bits past the bits it needs (64-bit builds): a sequential JPEG whose
# last scan is complete decodes fully when these zero bytes stand where its next marker stood.
_LOOKAHEAD = b"\0" * 8
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


class ImageTooComplex(ImageError):
    """Within the pixel limit, but more decoding work than allowed (a JPEG with too many scans).

    Its own code, not ``image_too_large``: the fix differs (re-encode with a standard progression
    or as baseline, not fewer pixels).
    """

    code = "image_too_complex"


class ImageHeader(NamedTuple):
    """What the file header says, without decoding pixels (a tuple: built on every placement).

    No frame count: the rule uses the first frame, and counting a TIFF's pages walks them all
    (PIL's ``n_frames`` is quadratic in the pages).
    """

    format: str  # PIL's format name, e.g. "PNG" (an MPO is "JPEG")
    mime: str
    raw_width: int  # as stored (PIL's size), no orientation applied
    raw_height: int
    width: int  # after EXIF orientation: the size every layout uses
    height: int


@contextlib.contextmanager
def _decoder_errors(what: str) -> Iterator[None]:
    """Any failure of PIL on the bytes is a :class:`CorruptImage`.

    PIL raises many types on hostile files (IndexError, struct.error, KeyError, SyntaxError,
    TypeError, OSError...); none may escape as a server error. MemoryError is the machine's
    trouble, not the image's: it is never reported as corrupt bytes.
    """
    try:
        yield
    except (ImageError, MemoryError):
        raise
    except Exception as exc:
        raise CorruptImage(f"{what}: {type(exc).__name__}: {exc}") from exc


def _open(data: bytes) -> tuple[Image.Image, str]:
    """PIL's image (header read, no pixels) and our format name for it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise UnsupportedImage("bytes are not a recognised image (PNG, JPEG, WebP, GIF, BMP, TIFF)") from exc
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises many types on hostile headers
        raise CorruptImage(f"unreadable image header: {type(exc).__name__}: {exc}") from exc
    fmt = _FORMAT_ALIASES.get(img.format, img.format)
    if fmt not in FORMAT_MIME:
        raise UnsupportedImage(
            f"image format {img.format} is not accepted (accepted: {', '.join(FORMAT_MIME)})"
        )
    return img, fmt


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
    except MemoryError:
        raise
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def check_area(width: int, height: int, max_pixels: int) -> None:
    """:class:`ImageTooLarge` for an image of more than ``max_pixels`` pixels."""
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )


def probe(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Read format and size from the header only (microseconds; no pixel decoding).

    Well-formed PNG and JPEG headers are read by :mod:`mmstore_client.headers`; everything else
    by PIL (the first frame's header only). Raises :class:`UnsupportedImage`,
    :class:`CorruptImage` or :class:`ImageTooLarge`, nothing else on any bytes.
    """
    fast = headers.read(data)
    if fast is not None:
        fmt, raw_w, raw_h, orientation = fast
    else:
        img, fmt = _open(data)
        with _decoder_errors("unreadable image header"):
            raw_w, raw_h = img.size
            # TIFF: PIL's libtiff decoder applies the orientation while loading without swapping the
            # stored width/height (checked against ImageOps.exif_transpose in the tests): TIFF keeps them.
            orientation = 1 if fmt == "TIFF" else _orientation(img)
    if raw_w <= 0 or raw_h <= 0:
        raise CorruptImage(f"image header gives an empty size {raw_w}x{raw_h}")
    check_area(raw_w, raw_h, max_pixels)
    if orientation in _SWAPPING_ORIENTATIONS:  # fields: format, mime, raw size, upright size
        return ImageHeader(fmt, FORMAT_MIME[fmt], raw_w, raw_h, raw_h, raw_w)
    return ImageHeader(fmt, FORMAT_MIME[fmt], raw_w, raw_h, raw_w, raw_h)


def verify(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS
) -> ImageHeader:
    """Probe, then decode the first frame fully, so truncated or corrupt data is refused."""
    header = probe(data, max_pixels=max_pixels)
    check_pixels(data, max_jpeg_scans=max_jpeg_scans)
    return header


def _open_for_decoding(data: bytes, max_jpeg_scans: int) -> tuple[Image.Image, str]:
    """:func:`_open`, after the checks that must come before a full decode.

    A JPEG's scans are counted (:class:`ImageTooComplex` past ``max_jpeg_scans``) and checked for
    missing data (:mod:`mmstore_client.jpeg_scans`). A sequential JPEG is then opened without the
    marker that ends its last scan (lookahead zeros instead): libjpeg pads a scan that ends early
    at a marker with grey and only warns, while a scan that runs out of bytes makes PIL report a
    truncated file. The pixels are the same: nothing after the last scan's data changes them.
    """
    img, fmt = _open(data)
    if fmt != "JPEG":
        return img, fmt
    try:
        scans = jpeg_scans.read(data, max_scans=max_jpeg_scans)
    except jpeg_scans.TooManyScans as exc:
        raise ImageTooComplex(
            f"JPEG has {exc}, over the limit of {max_jpeg_scans}: each scan is a pass over the whole "
            "image; re-encode it (baseline, or a standard progression)"
        ) from None
    except MemoryError:
        raise
    except Exception as exc:
        raise CorruptImage(f"unreadable JPEG structure: {type(exc).__name__}: {exc}") from exc
    missing = "the file has no frame header" if scans is None else scans.missing_data()
    if missing is not None:
        raise CorruptImage(f"JPEG data is truncated or corrupt: {missing}")
    # (progressive: libjpeg reads every scan up to EOI before any pixel; arithmetic: it cannot stop)
    if not scans.progressive and not scans.arithmetic:
        img, _ = _open(data[: scans.data_end] + _LOOKAHEAD)
    return img, fmt


def _load(img: Image.Image) -> None:
    """Decode the first frame; :class:`CorruptImage` if its data is truncated or corrupt."""
    # On at our call whatever another library in the process chose: a truncated file must fail
    # here, not decode grey-filled (PIL reads the flag while loading).
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with _decoder_errors("image data is truncated or corrupt"):
        img.seek(0)
        img.load()


def check_pixels(data: bytes, *, max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS) -> None:
    """Decode the first frame fully; :class:`CorruptImage` if its data is truncated or corrupt,
    :class:`ImageTooComplex` if decoding it would take too much work (checked first).

    The second half of :func:`verify`, for callers that probed first (the probe enforces the
    pixel limit, so never call this on bytes :func:`probe` has not accepted).
    """
    img, fmt = _open_for_decoding(data, max_jpeg_scans)
    if fmt == "JPEG":
        # DCT-domain downscaling: every entropy-coded byte is still read (so truncation is
        # caught), but the inverse transform runs at 1/8 scale: several times faster.
        with _decoder_errors("unreadable JPEG header"):
            img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
    _load(img)


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


def decode_rgb(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
    fit: int | None = None,
) -> Image.Image:
    """Bytes -> oriented, first-frame, 8-bit RGB image. The one rule; see the module docstring.

    ``fit`` (previews only, never for a model): decode at a reduced scale that still covers a
    ``fit`` x ``fit`` box (JPEG: DCT scaling, so the full size is never in memory; others: an
    integer ``reduce`` right after decoding, before any copy).
    """
    probe(data, max_pixels=max_pixels)
    img, fmt = _open_for_decoding(data, max_jpeg_scans)
    with _decoder_errors("image data is truncated or corrupt"):
        header_orientation = _orientation(img)
        if fit is not None and fmt == "JPEG":
            img.draft("RGB", (fit, fit))
    _load(img)
    with _decoder_errors("image data cannot be converted"):
        # PNG: the header's eXIf only (see _orientation). Others: read after loading, as
        # ImageOps.exif_transpose does, because some decoders (libtiff) apply the orientation
        # themselves while loading and clear the tag.
        orientation = header_orientation if fmt == "PNG" else _orientation(img)
        if fit is not None:
            img = _reduce(img, fit)
        if orientation in _TRANSPOSE:
            img = img.transpose(_TRANSPOSE[orientation])
        rgb = to_rgb(img)
        if rgb is img:
            # A plain Image over the same pixels, not the file's subclass: a PngImageFile's
            # getexif() would read the file again (vLLM's normalize_image calls it). Pillow's own
            # constructor for a new image over a core, as its methods use it; a copy() would
            # duplicate the pixels (2 ms for 1280x720).
            rgb = img._new(img.im)
    # The pixels are upright now: drop the metadata that says otherwise, or a consumer that
    # applies EXIF orientation itself (vLLM's normalize_image does) would rotate them again.
    for key in _ORIENTATION_METADATA:
        rgb.info.pop(key, None)
    return rgb


def _reduce(img: Image.Image, fit: int) -> Image.Image:
    """``img`` shrunk by the largest integer factor that keeps both sides at least ``fit``."""
    factor = min(img.width // fit, img.height // fit)
    if factor < 2:
        return img
    if img.mode not in ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F"):
        img = to_rgb(img)
    return img.reduce(factor)
