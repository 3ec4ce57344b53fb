"""The store's decode threads and pixel budget (``mmstore.decoding``), on real decodes."""

from __future__ import annotations

import io
import threading
import time

from mmstore.decoding import Decoder
from mmstore_client import decode
from PIL import Image


def _png(side: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (seed, 0, 9)).save(buf, format="PNG")
    return buf.getvalue()


def test_decodes_beyond_the_pixel_budget_wait_their_turn():
    """Budget 2.5 images: of 8 concurrent full-size decodes at most 2 run at once, all finish."""
    side = 400
    decoder = Decoder(threads=8, pixel_budget=side * side * 5 // 2, nice=0)
    running = peak = 0
    lock = threading.Lock()

    def full_decode(data: bytes) -> tuple[int, int]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            time.sleep(0.05)  # (so that decodes allowed to overlap do)
            return decode.decode_rgb(data).size
        finally:
            with lock:
                running -= 1

    futures = [decoder.submit(lambda d=_png(side, i): full_decode(d), side * side) for i in range(8)]
    assert [f.result(timeout=60) for f in futures] == [(side, side)] * 8
    assert peak == 2 and decoder.budget.in_use == 0 and decoder.budget.waiting == 0


def test_an_image_larger_than_the_budget_decodes_alone():
    decoder = Decoder(threads=2, pixel_budget=1000, nice=0)
    assert decoder.submit(lambda: decode.decode_rgb(_png(100, 1)).size, 100 * 100).result(timeout=60) == (
        100,
        100,
    )
    assert decoder.budget.in_use == 0
