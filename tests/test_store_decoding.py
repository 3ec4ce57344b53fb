"""The store's decode threads and pixel budget (``mmstore.decoding``), on real decodes."""

from __future__ import annotations

import io
import threading
import time
import zlib

from mmstore.decoding import Decoder
from mmstore_client import decode
from PIL import Image


def _png(side: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (seed, 0, 9)).save(buf, format="PNG")
    return buf.getvalue()


def _slow_pngs(count: int, side: int = 3000) -> list[bytes]:
    """``count`` distinct small files that each take a while to decode: one PNG of side x side
    pixels of one colour, told apart by a text chunk."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 9)).save(buf, format="PNG")
    png = buf.getvalue()
    iend = png.rindex(b"IEND") - 4
    out = []
    for i in range(count):
        text = b"Comment\0" + str(i).encode()
        chunk = len(text).to_bytes(4, "big") + b"tEXt" + text
        out.append(png[:iend] + chunk + zlib.crc32(chunk[4:]).to_bytes(4, "big") + png[iend:])
    return out


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


async def test_uploads_waiting_for_decodes_hold_none_of_the_readers_threads(tmp_path):
    """8 uploads queue for one decode thread: none holds a thread of the pool that reads and
    /readyz use (before: each decoded on one of its 40), and /healthz answers meanwhile."""
    import asyncio

    import anyio
    import httpx
    from mmstore.app import create_app
    from mmstore.settings import Settings
    from mmstore_client.digest import compute_digest

    app = create_app(Settings(root=tmp_path / "data", fsync=False, decode_threads=1))
    readers = anyio.to_thread.current_default_thread_limiter()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mmstore") as client:
        uploads = [
            asyncio.ensure_future(client.put(f"/v1/runs/r/blobs/{compute_digest(body)}", content=body))
            for body in _slow_pngs(8)
        ]
        await asyncio.sleep(0.3)  # every body is in (no network here); the decodes queue
        assert not all(u.done() for u in uploads)
        assert readers.borrowed_tokens == 0
        assert (await client.get("/healthz")).status_code == 200
        assert [r.status_code for r in await asyncio.gather(*uploads)] == [201] * 8
