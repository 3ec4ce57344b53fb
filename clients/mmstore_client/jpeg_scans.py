"""A JPEG's scans, read without decoding: the bounds libjpeg cannot enforce through Pillow.

libjpeg (through Pillow) has two blind spots that hostile or damaged files use:

* Work. A progressive JPEG may hold any number of scans, and every scan costs a pass over every
  block of its components: a 460 KB file of thousands of tiny scans took 48 s of CPU. Encoders
  write 10 (libjpeg's progression) to about 20 (mozjpeg); :func:`read` stops counting past the
  caller's limit, before any decoding.
* Missing data. When a scan's entropy-coded data ends early at a marker (a truncated file with an
  EOI appended, or a 631-byte file whose header claims 10000x10000), libjpeg only warns, fills the
  rest with zero coefficients (grey), and Pillow discards the warning. :meth:`Scans.missing_data`
  says what is provably missing from the structure: every component's every coefficient must be
  completed by some scan (a truncated progressive file loses its last scans), and a Huffman-coded
  sequential scan needs at least 2 bits per block (DC and AC codes are each at least one bit), a
  progressive DC scan 1. What the structure cannot show (a sequential scan cut short, then a
  marker) the caller checks by decoding up to :attr:`Scans.data_end` without the marker (see
  :func:`mmstore_client.decode.check_pixels`). Arithmetic-coded JPEGs (rare) get the structural
  check only: their decoder cannot stop for more data, and their bits per block have no floor.
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE = frozenset([0xC2, 0xC6, 0xCA, 0xCE])
_ARITHMETIC = frozenset(range(0xC9, 0xD0)) - {0xCC}
_EOI, _SOS = 0xD9, 0xDA
_ALL_COEFFICIENTS = (1 << 64) - 1


class TooManyScans(ValueError):
    """More scans than the caller's limit."""


class Scan(NamedTuple):
    components: tuple[int, ...]  # component ids
    ss: int  # spectral selection start / end (zig-zag indices)
    se: int
    al: int  # successive approximation, low bit (0: the band's last bit)
    data_bytes: int  # entropy-coded bytes (stuffing included)


class Scans(NamedTuple):
    blocks: dict[int, int]  # component id -> 8x8 blocks it holds
    progressive: bool
    arithmetic: bool
    scans: list[Scan]
    data_end: int  # where the last scan's entropy-coded data ends (its marker, or the file's end)

    def missing_data(self) -> str | None:
        """Why the scans cannot hold a complete image, or None."""
        if not self.scans:
            return "the file has no scan"
        done = dict.fromkeys(self.blocks, 0)  # component -> bit mask of completed coefficients
        for number, scan in enumerate(self.scans, 1):
            blocks = sum(self.blocks.get(c, 0) for c in scan.components)
            if not self.arithmetic:
                bits = blocks * (1 if self.progressive else 2) if scan.ss == 0 else 0
                if scan.data_bytes * 8 < bits:
                    return (
                        f"scan {number} holds {scan.data_bytes} bytes, fewer than its {blocks} blocks "
                        f"need ({(bits + 7) // 8})"
                    )
            band = _ALL_COEFFICIENTS  # a sequential scan completes its components
            if self.progressive:  # only the last bit (al == 0) of its band completes it
                band = (1 << (scan.se + 1)) - (1 << scan.ss) if scan.al == 0 and scan.ss <= scan.se else 0
            for c in scan.components:
                if c in done:
                    done[c] |= band
        incomplete = [c for c, mask in done.items() if mask != _ALL_COEFFICIENTS]
        if incomplete:
            return f"the scans end before component {incomplete[0]} is complete"
        return None


def read(data: bytes, *, max_scans: int) -> Scans | None:
    """The scans of a JPEG (up to its first EOI: an MPO's first picture), or None if it has no
    frame header. Raises :class:`TooManyScans` as soon as a scan past ``max_scans`` is found."""
    blocks: dict[int, int] | None = None
    progressive = arithmetic = False
    scans: list[Scan] = []
    end = data_end = len(data)
    pos = 2
    while True:
        found = _next_marker(data, pos)  # libjpeg skips bytes between segments too (with a warning)
        if found is None:
            break
        _, code, length_at = found
        body = length_at + 2
        if code == _EOI or body > end:
            break
        segment_end = length_at + struct.unpack_from(">H", data, length_at)[0]
        if code in _SOF and blocks is None:
            if segment_end > end or segment_end - body < 6:
                break
            _, height, width, count = struct.unpack_from(">BHHB", data, body)
            specs = [data[body + 6 + 3 * i : body + 9 + 3 * i] for i in range(count)]
            if not specs or len(specs[-1]) < 3:
                break
            h_max = max(s[1] >> 4 for s in specs) or 1
            v_max = max(s[1] & 15 for s in specs) or 1
            blocks = {
                s[0]: _ceil(_ceil(width * (s[1] >> 4), h_max), 8)
                * _ceil(_ceil(height * (s[1] & 15), v_max), 8)
                for s in specs
            }
            progressive, arithmetic = code in _PROGRESSIVE, code in _ARITHMETIC
        elif code == _SOS:
            if segment_end > end or body >= end:
                break
            count = data[body]
            if body + 1 + 2 * count + 3 > end:
                break
            components = tuple(data[body + 1 + 2 * i] for i in range(count))
            ss, se, approximation = data[body + 1 + 2 * count : body + 4 + 2 * count]
            following = _next_marker(data, segment_end)
            data_end = following[0] if following else end
            if len(scans) == max_scans:
                raise TooManyScans(f"more than {max_scans} scans")
            scans.append(Scan(components, ss, min(se, 63), approximation & 15, data_end - segment_end))
            pos = data_end
            continue
        pos = segment_end
    if blocks is None:
        return None
    return Scans(blocks, progressive, arithmetic, scans, data_end)


def _next_marker(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """The next marker at or after ``pos``: (where its last 0xFF is, its code, where it ends).

    A marker is 0xFF then a code that is not a stuffed zero, a restart (RSTn sits inside
    entropy-coded data) or a fill 0xFF. One regular expression with a literal first byte: C
    speed even over 64 MB of stuffed 0xFF 0x00 pairs (a loop in Python took 8 s there).
    """
    found = _MARKER.search(data, pos)
    return None if found is None else (found.start(), data[found.start() + 1], found.end())


def _ceil(a: int, b: int) -> int:
    return -(-a // b)
