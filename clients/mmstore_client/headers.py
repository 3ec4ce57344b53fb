"""Fast header readers for the two common formats (PNG, JPEG): size and EXIF orientation.

:func:`mmstore_client.decode.probe` answers "how big is this image, upright" for every image the
renderer places, every turn. PIL's ``Image.open`` answers it in 15-25 us, mostly Python-level
plumbing; these readers answer well-formed PNG and JPEG headers in a few microseconds.

They never decide anything PIL would decide differently: they read only what they fully
understand and return ``None`` for everything else (other formats, APNG, MPO, padding bytes,
chunks or segments whose PIL handler could refuse them, EXIF that is not a plain IFD0 with a
SHORT orientation, XMP without EXIF orientation, anything truncated or out of range), and the
caller then asks PIL. The tests compare them with PIL on generated files and mutated headers.
"""

from __future__ import annotations

import struct
import zlib

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (bit depth, colour type) pairs PIL maps to a mode (PngImagePlugin._MODES)
_PNG_MODES = frozenset(
    [(1, 0), (2, 0), (4, 0), (8, 0), (16, 0), (8, 2), (16, 2), (1, 3), (2, 3), (4, 3), (8, 3),
     (8, 4), (16, 4), (8, 6), (16, 6)]
)  # fmt: skip
# ancillary chunks before IDAT that PIL reads without refusing (minimum length) and that say
# nothing about size, orientation or frames; any other chunk sends the file to PIL
_PNG_PLAIN_CHUNKS = {
    b"PLTE": 0,
    b"sRGB": 1,
    b"gAMA": 4,
    b"cHRM": 32,
    b"pHYs": 9,
    b"tEXt": 0,  # unless its key is "exif" (PIL takes that text as EXIF) or it is large
    b"tIME": 0,
    b"bKGD": 0,
    b"sBIT": 0,
    b"cICP": 0,
}
_PNG_TEXT_LIMIT = 1 << 20
_JPEG_SOF = frozenset([0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF])
_JPEG_SKIPPED = frozenset([0xC4, 0xCC, 0xDD, 0xFE])  # DHT, DAC, DRI, COM: nothing PIL refuses
_XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
# TIFF field type -> bytes per value (PIL's ImageFileDirectory_v2 load table)
_TIFF_TYPE_SIZE = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
    16: 8,
    17: 8,
    18: 8,
}
_ORIENTATION_TAG = 0x0112

_u32be = struct.Struct(">I").unpack_from
_png_ihdr = struct.Struct(">IIBBBBB").unpack_from
_sof = struct.Struct(">BHHB").unpack_from
_segment = struct.Struct(">BBH").unpack_from  # 0xFF, marker, length


def read(data: bytes) -> tuple[str, int, int, int] | None:
    """``(format, raw width, raw height, EXIF orientation 1-8)``, or None: ask PIL."""
    if data[:8] == _PNG_SIGNATURE:
        answer = _png(data)
    elif data[:3] == b"\xff\xd8\xff":
        answer = _jpeg(data)
    else:
        return None
    return answer if answer is not None and answer[1] and answer[2] else None  # PIL refuses 0


def _png(data: bytes) -> tuple[str, int, int, int] | None:
    end = len(data)
    if end < 33 or data[12:16] != b"IHDR" or _u32be(data, 8)[0] != 13:
        return None
    width, height, depth, colour, _, filtering, _ = _png_ihdr(data, 16)
    if filtering or (depth, colour) not in _PNG_MODES or zlib.crc32(data[12:29]) != _u32be(data, 29)[0]:
        return None
    exif = None
    pos = 33
    while pos + 8 <= end:
        length = _u32be(data, pos)[0]
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            orientation = _exif_orientation(exif) if exif is not None else (1, False)
            return None if orientation is None else ("PNG", width, height, orientation[0])
        body_end = pos + 8 + length
        if body_end + 4 > end or zlib.crc32(data[pos + 4 : body_end]) != _u32be(data, body_end)[0]:
            return None
        if kind == b"eXIf":
            if exif is not None:
                return None
            exif = data[pos + 8 : body_end]
        elif kind == b"tEXt":
            if (
                length > _PNG_TEXT_LIMIT
                or data.startswith(b"exif\0", pos + 8)
                or data[pos + 8 : body_end] == b"exif"
            ):
                return None
        elif kind not in _PNG_PLAIN_CHUNKS or length < _PNG_PLAIN_CHUNKS[kind]:
            return None  # PIL reads it with rules of its own, or refuses it
        pos = body_end + 4
    return None


def _jpeg(data: bytes) -> tuple[str, int, int, int] | None:
    end = len(data)
    pos = 2
    size = exif = None
    xmp = False
    while pos + 4 <= end:
        fill, marker, length = _segment(data, pos)
        if fill != 0xFF:
            return None
        body = pos + 4
        pos += 2 + length
        if length < 2 or pos > end:
            return None
        if marker in _JPEG_SKIPPED:
            continue
        if marker == 0xDB:
            if not (length == 67 and data[body] < 16) and not _dqt_ok(data, body, pos):
                return None  # (the common case, one 8-bit table, checked inline)
        elif marker == 0xDA:  # start of scan: the header is complete
            if size is None:
                return None
            orientation = _exif_orientation(exif) if exif is not None else (1, False)
            if orientation is None or (xmp and not orientation[1]):
                return None  # PIL would look for an orientation in the XMP
            return ("JPEG", size[0], size[1], orientation[0])
        elif marker in _JPEG_SOF:
            if size is not None or length < 8 or (length - 8) % 3:
                return None  # a second frame header, or one PIL refuses
            bits, height, width, layers = _sof(data, body)
            if bits != 8 or layers not in (1, 3, 4):
                return None
            size = (width, height)
        elif 0xE0 <= marker <= 0xEF:
            if length < 16 and (
                (marker == 0xE0 and data.startswith(b"JFIF", body) and length < 9)
                or (marker == 0xEE and data.startswith(b"Adobe", body) and length < 9)
                or (marker == 0xE2 and data.startswith(b"ICC_PROFILE\0", body))
            ):
                return None  # too short for PIL's reading of it
            if marker == 0xE1:
                if data.startswith(b"Exif\0\0", body):
                    if exif is not None:
                        return None  # PIL concatenates several: let it
                    exif = data[body + 6 : pos]
                elif data.startswith(_XMP_PREFIX, body):
                    xmp = True
            elif marker == 0xE2 and data.startswith(b"MPF\0", body):
                return None  # perhaps an MPO
        else:
            return None
    return None


def _dqt_ok(data: bytes, pos: int, end: int) -> bool:
    """Every quantization table complete (PIL refuses the file otherwise)."""
    while pos < end:
        pos += 1 + (64 if data[pos] < 16 else 128)
    return pos == end


def _ifd0(tiff: bytes) -> tuple[str, int, int] | None:
    """(byte order, first entry offset, entry count) of a plain TIFF header, or None."""
    if len(tiff) < 8:
        return None
    order = tiff[:4]
    if order == b"II*\x00":
        endian = "<"
    elif order == b"MM\x00*":
        endian = ">"
    else:
        return None
    (offset,) = struct.unpack_from(endian + "I", tiff, 4)
    if offset + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(endian + "H", tiff, offset)
    if offset + 2 + 12 * count + 4 > len(tiff):  # PIL reads the next-IFD pointer too
        return None
    return endian, offset + 2, count


def _exif_orientation(tiff: bytes) -> tuple[int, bool] | None:
    """(IFD0's orientation, 1 when absent or out of 1-8; whether the tag is there), or None: ask PIL."""
    ifd = _ifd0(tiff)
    if ifd is None:
        return None
    endian, pos, count = ifd
    entry = struct.Struct(endian + "HHI4s").unpack_from
    orientation = None
    for i in range(count):
        tag, kind, n, value = entry(tiff, pos + 12 * i)
        unit = _TIFF_TYPE_SIZE.get(kind)
        if unit is None or n == 0:
            continue
        size = unit * n
        if size > 4 and struct.unpack_from(endian + "I", value)[0] + size > len(tiff):
            return None  # PIL skips or stops at this value: let it
        if tag == _ORIENTATION_TAG:
            if orientation is not None or kind != 3 or n != 1:
                return None
            (orientation,) = struct.unpack_from(endian + "H", value)
    if orientation is None:
        return 1, False
    return (orientation if 1 <= orientation <= 8 else 1), True
