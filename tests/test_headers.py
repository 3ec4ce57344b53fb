"""The fast PNG/JPEG header reader answers exactly what PIL answers, or leaves the file to PIL.

``headers.read`` is what ``decode.probe`` (and so every layout placement) uses first. A wrong
answer there would give the renderer a token count vLLM and the trainer disagree with, so every
answer it gives is compared with PIL's (open + the decoding rule's orientation) on generated files
of every mode and orientation and on thousands of mutated and truncated headers.
"""

from __future__ import annotations

import io
import random
import struct
import zlib

import pytest
from mmstore_client import decode, headers
from PIL import Image, PngImagePlugin


def _pil(data: bytes):
    """PIL's answer, under the decoding rule (what probe gave before the fast reader)."""
    try:
        img, _ = decode._open(data)
        if img.format not in ("PNG", "JPEG"):
            return ("other", img.format)
        return (img.format, *img.size, decode._orientation(img))
    except decode.ImageError:
        return "refused"


def _exif(orientation: int | None, endian: str = "<", extra: int = 0) -> Image.Exif:
    exif = Image.Exif()
    exif.endian = endian
    if orientation is not None:
        exif[0x0112] = orientation
    exif[0x010F] = "mmstore camera"  # Make: an ASCII value stored out of line
    for i in range(extra):
        exif[0x9000 + i] = b"x" * (i + 5)
    return exif


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _corpus() -> dict[str, bytes]:
    rgb = Image.linear_gradient("L").resize((37, 23)).convert("RGB")
    out: dict[str, bytes] = {}
    for mode in ("1", "L", "P", "RGB", "RGBA", "LA", "I;16"):
        out[f"png-{mode}"] = _encode(rgb.convert(mode) if mode != "I;16" else rgb.convert("I;16"), "PNG")
    out["png-interlaced"] = _encode(rgb, "PNG", optimize=False, interlace=1)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "mmstore tests")
    info.add_text("Comment", "x" * 300, zip=True)  # zTXt: left to PIL
    out["png-ztxt"] = _encode(rgb, "PNG", pnginfo=info)
    plain = PngImagePlugin.PngInfo()
    plain.add_text("Software", "mmstore tests")
    out["png-text"] = _encode(rgb, "PNG", pnginfo=plain, dpi=(144, 144))
    out["png-apng"] = _encode(rgb, "PNG", save_all=True, append_images=[rgb.rotate(90)])
    out["png-icc"] = _encode(rgb, "PNG", icc_profile=b"\0" * 200)
    for o in range(0, 10):
        out[f"png-exif-{o}"] = _encode(rgb, "PNG", exif=_exif(o))
        out[f"jpeg-exif-{o}"] = _encode(rgb, "JPEG", exif=_exif(o))
        out[f"jpeg-exif-be-{o}"] = _encode(rgb, "JPEG", exif=_exif(o, ">", extra=3))
    out["jpeg-exif-no-orientation"] = _encode(rgb, "JPEG", exif=_exif(None))
    xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    out["jpeg-xmp-only"] = _encode(rgb, "JPEG", xmp=xmp)
    out["jpeg-xmp-and-exif"] = _encode(rgb, "JPEG", xmp=xmp, exif=_exif(3))
    for mode in ("L", "RGB", "CMYK"):
        out[f"jpeg-{mode}"] = _encode(rgb.convert(mode), "JPEG", quality=90)
    out["jpeg-progressive"] = _encode(rgb, "JPEG", progressive=True, optimize=True)
    out["jpeg-icc-comment"] = _encode(rgb, "JPEG", icc_profile=b"\1" * 70000, comment=b"hello")
    out["jpeg-subsampling-444"] = _encode(rgb, "JPEG", subsampling=0, dpi=(300, 300))
    out["jpeg-mpo"] = _encode(rgb, "MPO", save_all=True, append_images=[rgb.rotate(90)])
    out["webp"] = _encode(rgb, "WEBP")
    return out


CORPUS = _corpus()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_agrees_with_pil_on_every_generated_file(name):
    data = CORPUS[name]
    fast = headers.read(data)
    if fast is not None:
        assert fast == _pil(data)
    pil = _pil(data)
    if pil[0] in ("PNG", "JPEG"):
        probed = decode.probe(data)
        swap = pil[3] in (5, 6, 7, 8)
        assert (probed.format, probed.raw_width, probed.raw_height) == pil[:3]
        assert (probed.width, probed.height) == ((pil[2], pil[1]) if swap else (pil[1], pil[2]))


def test_reads_the_common_files_itself():
    """The fast path is taken for what screenshots and photos usually are (else it is dead weight)."""
    answered = {name for name, data in CORPUS.items() if headers.read(data) is not None}
    expected = {"png-1", "png-L", "png-P", "png-RGB", "png-RGBA", "png-LA", "png-I;16", "png-text"}
    expected |= {f"png-exif-{o}" for o in range(10)} | {f"jpeg-exif-{o}" for o in range(10)}
    expected |= {f"jpeg-exif-be-{o}" for o in range(10)} | {"jpeg-L", "jpeg-RGB", "jpeg-CMYK"}
    expected |= {"jpeg-progressive", "jpeg-icc-comment", "jpeg-exif-no-orientation", "jpeg-xmp-and-exif"}
    assert expected <= answered
    # left to PIL: APNG frames, zTXt and iCCP (compressed), MPO, XMP-only orientation, WebP
    for name in ("png-apng", "png-ztxt", "png-icc", "jpeg-mpo", "jpeg-xmp-only", "webp"):
        assert name not in answered
    assert decode.probe(CORPUS["jpeg-xmp-only"]).width == 23  # PIL's XMP orientation 6 swaps


def _fix_png_crcs(data: bytearray) -> None:
    """Recompute every chunk CRC up to IDAT, so mutations reach the chunk parsers."""
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data):
            return
        struct.pack_into(">I", data, end, zlib.crc32(bytes(data[pos + 4 : end])))
        if data[pos + 4 : pos + 8] == b"IDAT":
            return
        pos = end + 4


def _mutants(data: bytes, rng: random.Random, n: int):
    header = min(len(data), 400)
    for _ in range(n):
        m = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(2, header)
            m[i] = rng.choice([0, 1, 2, 3, 6, 8, 0x12, 0x7F, 0xFF, rng.randrange(256)])
        if data.startswith(b"\x89PNG") and rng.random() < 0.8:
            _fix_png_crcs(m)
        yield bytes(m)
    for cut in rng.sample(range(1, header), min(40, header - 1)):
        yield data[:cut]


@pytest.mark.parametrize("name", sorted(n for n in CORPUS if n.startswith(("png", "jpeg"))))
def test_mutated_and_truncated_headers_never_get_an_answer_pil_would_not_give(name):
    rng = random.Random(name)
    answered = 0
    for data in _mutants(CORPUS[name], rng, 150):
        fast = headers.read(data)
        if fast is not None:
            answered += 1
            assert fast == _pil(data), data[:64]
    assert answered > 0 or name in ("png-apng", "png-ztxt", "png-icc", "jpeg-mpo", "jpeg-xmp-only")
