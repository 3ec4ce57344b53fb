"""The store on S3: mmstore over an S3 server vs the same operations straight against it.

Part of ``bench/store_bench.py`` (its ``--s3`` case). A moto S3 server process (the one the
tests use: ``tests/support.py``) holds a bucket; ``mmstore serve --storage s3://...`` runs on
it. Both paths are driven by the same client library, obstore (the one the S3 backend uses):
``S3Store`` for the direct path, ``HTTPStore`` on mmstore's base URL for the other, so the
difference is mmstore alone. GET reads the very objects mmstore stored (same key, same bytes);
PUT writes new images; mmstore checks the digest, decodes the image and makes the backend's
requests (existence HEAD, guard claim, conditional create, ref, link, run counter, guard check).
Two direct PUT paths are measured: one unconditional PUT of the same bytes, and those same
backend requests made in-process by the backend's own class (``S3Storage.link_existing`` +
``put``), with no HTTP hop, digest or decode: what the object store costs mmstore's semantics.
mmstore runs with its defaults, so its GETs of blobs of 1 MB or more answer 307 to a presigned
URL, which the client (obstore, like mmstore's own clients) follows to the bucket; a second
replica on the same bucket, with ``MMSTORE_REDIRECT_MIN_BYTES=off``, streams those blobs too
(``mmstore, streamed``).
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import obstore
from benchlib import open_env
from mmstore_rollout.stack import Stack, store_service, wait_ready
from obstore.store import HTTPStore, S3Store

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' moto server runner, shared
from mmstore.settings import REDIRECT_MIN_BYTES  # noqa: E402
from mmstore.storage.s3 import S3Storage  # noqa: E402
from mmstore.storage.s3_layout import blob_key  # noqa: E402
from mmstore_client import decode  # noqa: E402
from mmstore_client.digest import compute_digest, digest_hex  # noqa: E402
from mmstore_client.models import BlobInfo  # noqa: E402
from support import S3Server  # noqa: E402

TARGET = 0.30  # mmstore's p50 latency at most 30% above the direct path's
RUN = "bench-s3"
DIRECT = "direct"
SAME_REQUESTS = "direct, the backend's requests"
STREAMED = "mmstore, streamed"  # a replica with MMSTORE_REDIRECT_MIN_BYTES=off


@dataclass
class S3Row:
    op: str
    size: str
    concurrency: int
    path: str  # DIRECT | SAME_REQUESTS | "mmstore"
    requests: int
    errors: int
    req_s: float
    mb_s: float
    p50_ms: float
    p99_ms: float
    overhead: float | None = None  # mmstore p50 / direct p50 - 1
    note: str = ""


async def _drive(op: Callable[[int], Awaitable[int]], concurrency: int, duration: float) -> tuple:
    """``concurrency`` loops calling ``op(i)`` (i = 0, 1, ...) for ``duration`` s."""
    latencies: list[float] = []
    errors = 0
    payload = 0
    counter = iter(range(1 << 62))
    stop = time.monotonic() + duration

    async def loop() -> None:
        nonlocal errors, payload
        while time.monotonic() < stop:
            i = next(counter)
            t0 = time.perf_counter()
            try:
                payload += await op(i)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return latencies, errors, payload, time.perf_counter() - started


async def _interleaved(
    paths: list[tuple[str, Callable[[int], Awaitable[int]]]],
    concurrency: int,
    duration: float,
    rounds: int,
    after: Callable[[str, tuple], None] = lambda path, measured: None,
) -> dict[str, tuple]:
    """Every path for ``duration / rounds`` s, in turn, ``rounds`` times (a slow spell of the
    machine then hits every path alike). Per path: the rounds pooled, and each round's p50 (ms).
    ``after(path, measured)`` follows each round of a path."""
    pooled: dict[str, tuple] = {path: ([], 0, 0, 0.0, []) for path, _ in paths}
    for _ in range(rounds):
        for path, op in paths:
            measured = await _drive(op, concurrency, duration / rounds)
            after(path, measured)
            latencies, errors, payload, secs, p50s = pooled[path]
            latencies.extend(measured[0])
            p50s.append(statistics.median(measured[0] or [float("nan")]) * 1e3)
            pooled[path] = (latencies, errors + measured[1], payload + measured[2], secs + measured[3], p50s)
    return pooled


def _row(op: str, size: str, concurrency: int, path: str, measured: tuple) -> S3Row:
    latencies, errors, payload, secs, p50s = measured
    ordered = sorted(latencies) or [float("nan")]
    return S3Row(
        op=op,
        size=size,
        concurrency=concurrency,
        path=path,
        requests=len(latencies),
        errors=errors,
        req_s=len(latencies) / secs,
        mb_s=payload / secs / 1e6,
        p50_ms=statistics.median(ordered) * 1e3,
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
        note="rounds' p50: " + " / ".join(f"{p:.2f}" for p in p50s) if len(p50s) > 1 else "",
    )


async def _measure(
    direct: S3Store,
    backend: S3Storage,
    http: HTTPStore,
    http_streamed: HTTPStore,
    gets: dict[str, list[tuple[str, int]]],
    puts: dict[str, list[tuple[BlobInfo, bytes]]],
    concurrencies: list[int],
    duration: float,
    rounds: int,
    console,
) -> list[S3Row]:
    rows: list[S3Row] = []
    for size, blobs in gets.items():
        for c in concurrencies:

            def getter(store, key_of, blobs=blobs) -> Callable[[int], Awaitable[int]]:
                async def get(i: int) -> int:
                    digest, size = blobs[i % len(blobs)]
                    got = len(await (await obstore.get_async(store, key_of(digest))).bytes_async())
                    if got != size:
                        raise RuntimeError(f"{digest}: {got} bytes, expected {size}")
                    return got

                return get

            paths = [
                (DIRECT, getter(direct, lambda d: blob_key(digest_hex(d)))),
                ("mmstore", getter(http, lambda d: f"v1/blobs/{d}")),
            ]
            if min(n for _, n in blobs) >= REDIRECT_MIN_BYTES:  # "mmstore" redirects these
                paths.append((STREAMED, getter(http_streamed, lambda d: f"v1/blobs/{d}")))
            for _, op in paths:
                await _drive(op, c, min(1.0, duration))  # warm-up: connections, mmstore's info cache
            for path, measured in (await _interleaved(paths, c, duration, rounds)).items():
                rows.append(_row("GET", size, c, path, measured))
    for size, images in puts.items():
        # distinct images for each path that creates blobs: mmstore's half and the backend's half
        half = len(images) // 2
        sets = {"mmstore": images[:half], SAME_REQUESTS: images[half:], DIRECT: images[:half]}
        used = dict.fromkeys(sets, 0)
        for c in concurrencies:
            pool = ThreadPoolExecutor(c)

            def pick(path: str, i: int, used=used, sets=sets) -> tuple[BlobInfo, bytes]:
                return sets[path][(used[path] + i) % len(sets[path])]

            async def direct_put(i: int, c=c, pick=pick) -> int:
                _, data = pick(DIRECT, i)
                key = f"bench-direct/c{c}/{i}"
                await obstore.put_async(direct, key, data, use_multipart=False)
                return len(data)

            def backend_put(info: BlobInfo, data: bytes) -> None:
                if backend.link_existing(RUN + "-direct", info.digest) is None:
                    backend.put(RUN + "-direct", info.digest, data, info)

            async def same_requests_put(i: int, pool=pool, pick=pick) -> int:
                info, data = pick(SAME_REQUESTS, i)
                await asyncio.get_running_loop().run_in_executor(
                    pool, functools.partial(backend_put, info, data)
                )
                return len(data)

            async def mmstore_put(i: int, pick=pick) -> int:
                info, data = pick("mmstore", i)
                await obstore.put_async(http, f"v1/runs/{RUN}/blobs/{info.digest}", data)
                return len(data)

            def advance(path: str, measured: tuple, used=used) -> None:  # the next round: new images
                used[path] += len(measured[0]) + measured[1]

            paths = [(DIRECT, direct_put), (SAME_REQUESTS, same_requests_put), ("mmstore", mmstore_put)]
            for path, measured in (await _interleaved(paths, c, duration, rounds, advance)).items():
                row = _row("PUT new", size, c, path, measured)
                if path != DIRECT and used[path] > len(sets[path]):
                    row.note = "; ".join(
                        filter(None, [row.note, "image set exhausted: some uploads were dedup hits"])
                    )
                rows.append(row)
            pool.shutdown()
    for row in rows:
        if row.path.startswith("mmstore"):
            reference = SAME_REQUESTS if row.op.startswith("PUT") else DIRECT
            ref = _find(rows, row, reference)
            row.overhead = row.p50_ms / ref.p50_ms - 1
            if reference != DIRECT:
                one_put = _find(rows, row, DIRECT).p50_ms
                row.note = "; ".join(filter(None, [f"{row.p50_ms / one_put - 1:+.0%} vs one PUT", row.note]))
        console.print(
            f"  s3 {row.op} {row.size} c{row.concurrency} {row.path}: {row.req_s:,.0f} req/s "
            f"p50 {row.p50_ms:.2f} ms p99 {row.p99_ms:.2f} ms errors {row.errors}"
            + (f" overhead {row.overhead:+.0%}" if row.overhead is not None else "")
        )
    return rows


def _find(rows: list[S3Row], like: S3Row, path: str) -> S3Row:
    (found,) = [
        r
        for r in rows
        if (r.op, r.size, r.concurrency, r.path) == (like.op, like.size, like.concurrency, path)
    ]
    return found


def run(
    stack: Stack,
    tmp: Path,
    get_files: dict[str, list[tuple[str, Path]]],
    put_sizes: list[str],
    make_image: Callable[[str, int], bytes],
    *,
    concurrencies: list[int],
    duration: float,
    rounds: int,
    put_limit: int,
    console,
) -> tuple[list[S3Row], dict]:
    """Start moto and mmstore on it, upload the GET sets through mmstore, measure both paths.

    ``make_image(size, i)``: the i-th distinct image of a PUT size; ``put_limit`` of them per size
    and creating path (mmstore, the backend's requests) are made before the clock starts.
    """
    s3 = S3Server(tmp / "moto.log").start()
    try:
        url = s3.bucket("store")
        bucket = url.removeprefix("s3://").split("/", 1)[0]
        server = stack.start(store_service(tmp, storage=url, env=open_env(**s3.env), name="mmstore-s3"))
        streamed_env = open_env(**s3.env, MMSTORE_REDIRECT_MIN_BYTES="off")
        streamed = stack.start(store_service(tmp, storage=url, env=streamed_env, name="mmstore-s3-streamed"))
        wait_ready([server, streamed], 30)
        base, base_streamed = server.url, streamed.url
        gets: dict[str, list[tuple[str, int]]] = {}
        with httpx.Client(base_url=base, timeout=120) as client:
            for size, files in get_files.items():
                gets[size] = []
                for digest, f in files:
                    data = f.read_bytes()
                    r = client.put(f"/v1/runs/{RUN}-get/blobs/{digest}", content=data)
                    if r.status_code not in (200, 201):
                        raise RuntimeError(f"upload to mmstore on S3 failed: {r.status_code} {r.text[:300]}")
                    gets[size].append((digest, len(data)))
        puts = {}
        for size in put_sizes:  # distinct images for both creating paths, made here (in memory)
            puts[size] = []
            for i in range(2 * put_limit):
                data = make_image(size, i)
                puts[size].append((BlobInfo.of(compute_digest(data), len(data), decode.probe(data)), data))
        direct = S3Store(
            bucket,
            prefix="store",
            config=s3.config,
            client_options={"allow_http": True},
        )
        http = HTTPStore.from_url(base, client_options={"allow_http": True})
        http_streamed = HTTPStore.from_url(base_streamed, client_options={"allow_http": True})
        backend = S3Storage(url, config=s3.config)
        rows = asyncio.run(
            _measure(
                direct, backend, http, http_streamed, gets, puts, concurrencies, duration, rounds, console
            )
        )
        stack.stop(server, streamed)
        return rows, {"endpoint": s3.endpoint, "storage": url}
    finally:
        s3.stop()


COLS = [
    "op",
    "size",
    "clients",
    "path",
    "req/s",
    "MB/s",
    "p50 ms",
    "p99 ms",
    "p50 vs direct",
    "target",
    "note",
]


def cells(r: S3Row) -> list[str]:
    target = ""
    if r.overhead is not None:
        target = ("met" if r.overhead <= TARGET else "not met") + f" (<= +{TARGET:.0%})"
    return [
        r.op, r.size, str(r.concurrency), r.path, f"{r.req_s:,.0f}", f"{r.mb_s:,.1f}", f"{r.p50_ms:.2f}",
        f"{r.p99_ms:.2f}", "" if r.overhead is None else f"{r.overhead:+.0%}", target,
        r.note + (f"{'; ' if r.note else ''}{r.errors} errors" if r.errors else ""),
    ]  # fmt: skip
