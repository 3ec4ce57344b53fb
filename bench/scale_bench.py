"""The local store as it grows: the same figures at 10^4 and 10^5 images, side by side.

For each size and layout (the images spread over 100 runs, or all in one run) a fresh store
(``mmstore serve``, 2 workers, fsync on, a root on the real disk) is filled with distinct 64x64
PNGs, then measured: PUT rate while filling, GET and HEAD latency over random stored blobs,
listing, restart, deletion of half the images (50 runs, or the one run: all of them) and the GC
that collects them, each while uploads keep arriving (the longest of those uploads is the write
outage), the write-ahead log after GC, and disk, inodes and index per image. Every figure is
printed with its growth factor from the smallest size to the largest, and the ``## Local store
at scale`` section of ``bench/RESULTS.md`` is rewritten.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import httpx
import typer
from benchlib import (
    RESULTS,
    KeepTmpOption,
    OutputOption,
    WriteOption,
    add_to_path,
    cleanup,
    console,
    interrupt_on,
    loadavg,
    machine,
    make_app,
    md_table,
    open_env,
    rich_table,
    write_section,
)
from mmstore_rollout.stack import Stack, store_service, wait_ready

add_to_path("clients")
from mmstore_client.digest import compute_digest  # noqa: E402
from PIL import Image  # noqa: E402

app = make_app(__doc__)

TARGETS = {
    "longest PUT during DELETE (ms)": "< 250",
    "longest PUT during GC (ms)": "< 250",
    "DELETE per link (us)": "growth <= 1.3x",
    "GC per blob (us)": "growth <= 1.3x",
    "WAL after GC (MB)": "< 64",
    "GET p99 (ms)": "growth < 1.5x",
    "HEAD p99 (ms)": "growth < 1.5x",
}


def png(i: int) -> bytes:
    """A distinct 64x64 PNG (a few hundred bytes: the index in the first pixels, a flat rest)."""
    img = Image.new("RGB", (64, 64), (i % 251, (i // 251) % 241, 90))
    img.putpixel((0, 0), (i & 0xFF, (i >> 8) & 0xFF, (i >> 16) & 0xFF))
    img.putpixel((1, 0), ((i >> 24) & 0xFF, 7, 11))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Case:
    size: int
    runs: int
    figures: dict[str, float] = field(default_factory=dict)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def put_all(
    client: httpx.AsyncClient, items: list[tuple[str, bytes, str]], concurrency: int
) -> list[float]:
    """PUT each ``(run, data, digest)``; the latency of each, in seconds."""
    queue = iter(items)
    latencies: list[float] = []

    async def worker() -> None:
        for run, data, digest in queue:
            t = time.perf_counter()
            r = await client.put(f"/v1/runs/{run}/blobs/{digest}", content=data)
            latencies.append(time.perf_counter() - t)
            if r.status_code not in (200, 201):
                raise RuntimeError(f"PUT answered {r.status_code}: {r.text[:300]}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def read_latencies(
    client: httpx.AsyncClient, digests: list[str], method: str, concurrency: int
) -> list[float]:
    queue = iter(digests)
    latencies: list[float] = []

    async def worker() -> None:
        for d in queue:
            t = time.perf_counter()
            r = await client.request(method, f"/v1/blobs/{d}")
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise RuntimeError(f"{method} answered {r.status_code}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def while_uploading(
    client: httpx.AsyncClient, action, fresh: Iterator[tuple[str, bytes, str]], uploaders: int
) -> tuple[float, list[float]]:
    """Run ``action`` (a coroutine function) while ``uploaders`` clients PUT fresh images one after
    another; the action's seconds and the latency in seconds of every upload started during it.

    The uploads start 0.2 s before the action and those are not counted: the first uploads after
    the store's restart wait 100-500 ms on cold worker processes (caches, first connections),
    which is no part of a deletion or GC (seen at t=0 in every run, before the action began).
    """
    done = asyncio.Event()
    latencies: list[float] = []
    action_started = float("inf")

    async def upload() -> None:
        for run, data, digest in fresh:
            if done.is_set():
                return
            t = time.perf_counter()
            r = await client.put(f"/v1/runs/{run}/blobs/{digest}", content=data)
            if t >= action_started:
                latencies.append(time.perf_counter() - t)
            if r.status_code not in (200, 201):
                raise RuntimeError(f"PUT during the action answered {r.status_code}: {r.text[:300]}")

    tasks = [asyncio.create_task(upload()) for _ in range(uploaders)]
    await asyncio.sleep(0.2)  # the uploads are flowing before the action starts
    action_started = time.perf_counter()
    await action()
    elapsed = time.perf_counter() - action_started
    done.set()
    await asyncio.gather(*tasks)
    return elapsed, latencies


def disk_usage(root: Path) -> tuple[int, int]:
    """Bytes allocated and inodes used under ``root``/blobs (files and folders)."""
    allocated = inodes = 0
    for dirpath, dirnames, filenames in os.walk(root / "blobs"):
        inodes += len(dirnames) + len(filenames)
        for name in filenames:
            allocated += os.stat(os.path.join(dirpath, name)).st_blocks * 512
    return allocated, inodes


def run_case(case: Case, tmp: Path, stack: Stack, concurrency: int, uploaders: int) -> None:
    root = tmp / f"root-{case.size}-{case.runs}"
    env = open_env(MMSTORE_WORKERS="2", MMSTORE_FSYNC="true", MMSTORE_GC_GRACE_SECONDS="0")
    store = stack.start(store_service(tmp, root=root, env=env, name=f"store-{case.size}-{case.runs}"))
    wait_ready([store], 30)
    base = store.url
    f = case.figures
    offset = case.size * 10 + case.runs * 1_000_000_000  # distinct images across cases
    images = [png(offset + i) for i in range(case.size)]
    digests = [compute_digest(d) for d in images]
    run_of = [f"run-{i % case.runs:03d}" for i in range(case.size)]
    # uploads made during DELETE and GC, made as they are needed (never measured in their latency)
    fresh = (("during", d, compute_digest(d)) for d in map(png, itertools.count(offset + case.size)))

    async def measure() -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
            t = time.perf_counter()
            await put_all(client, list(zip(run_of, images, digests, strict=True)), concurrency)
            f["PUT rate (images/s)"] = case.size / (time.perf_counter() - t)
            console.print(f"  filled: {f['PUT rate (images/s)']:.0f} images/s")
            sample = random.Random(case.size).choices(digests, k=4000)
            await read_latencies(client, sample[:500], "GET", 4)  # warm-up: each worker's cache
            for method in ("GET", "HEAD"):
                lat = await read_latencies(client, sample, method, 4)
                f[f"{method} p50 (ms)"] = pct(lat, 0.5) * 1e3
                f[f"{method} p99 (ms)"] = pct(lat, 0.99) * 1e3
                f[f"{method} max (ms)"] = max(lat) * 1e3
            t = time.perf_counter()
            r = await client.get("/v1/runs")
            f["list runs (ms)"] = (time.perf_counter() - t) * 1e3
            assert len(r.json()["runs"]) == case.runs
            run0 = run_of[0]
            cursor = sorted(d for d, r_ in zip(digests, run_of, strict=True) if r_ == run0)[-51]
            t = time.perf_counter()
            r = await client.get(f"/v1/runs/{run0}/blobs", params={"limit": 50, "cursor": cursor})
            f["last page of 50 blobs (ms)"] = (time.perf_counter() - t) * 1e3
            assert len(r.json()["blobs"]) == 50
        store.stop()
        f["index per image (bytes)"] = (root / "index.sqlite3").stat().st_size / case.size
        allocated, inodes = disk_usage(root)
        f["disk per image (bytes)"] = allocated / case.size
        f["inodes per image"] = inodes / case.size
        t = time.perf_counter()
        store.start(timeout=600)  # the same port and root
        f["restart (s)"] = time.perf_counter() - t
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
            doomed = sorted(set(run_of))[: max(1, case.runs // 2)]
            links = sum(1 for r_ in run_of if r_ in doomed)

            async def delete() -> None:
                for run in doomed:
                    r = await client.delete(f"/v1/runs/{run}")
                    r.raise_for_status()

            elapsed, lat = await while_uploading(client, delete, fresh, uploaders)
            f["links deleted"] = links
            f["DELETE per link (us)"] = elapsed / links * 1e6
            f["longest PUT during DELETE (ms)"] = max(lat) * 1e3
            f["PUT p50 during DELETE (ms)"] = pct(lat, 0.5) * 1e3
            gc_report = {}

            async def gc() -> None:
                r = await client.post("/v1/gc", json={"grace_seconds": 0})
                r.raise_for_status()
                gc_report.update(r.json())

            elapsed, lat = await while_uploading(client, gc, fresh, uploaders)
            f["blobs collected"] = gc_report["deleted"]
            f["GC per blob (us)"] = elapsed / max(1, gc_report["deleted"]) * 1e6
            f["longest PUT during GC (ms)"] = max(lat) * 1e3
            f["PUT p50 during GC (ms)"] = pct(lat, 0.5) * 1e3
            wal = root / "index.sqlite3-wal"
            f["WAL after GC (MB)"] = (wal.stat().st_size if wal.exists() else 0) / 1e6

    asyncio.run(measure())
    stack.stop(store)
    f["image bytes (avg)"] = statistics.mean(len(d) for d in images)
    f["blobs after GC"] = sum(1 for p in (root / "blobs").rglob("*") if p.is_file())


def fmt(v: float) -> str:
    if v != v:
        return "nan"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def report(
    cases: list[Case],
    info: dict[str, str],
    load_before: str,
    load_after: str,
    minutes: float,
    concurrency: int,
    uploaders: int,
    output: Path | None,
) -> None:
    """Print the table of ``cases`` and (``output``) rewrite its section of the results file."""
    size_list = sorted({c.size for c in cases})
    layout_list = sorted({c.runs for c in cases}, reverse=True)
    sizes = ",".join(map(str, size_list))
    layouts = ",".join(map(str, layout_list))
    lo, hi = min(size_list), max(size_list)
    cols = ["figure", "runs", *(f"{s:,} images" for s in size_list), f"growth {lo:,} -> {hi:,}", "target"]
    rows = []
    for runs in layout_list:
        by_size = {c.size: c for c in cases if c.runs == runs}
        for name in by_size[lo].figures:
            values = [by_size[s].figures[name] for s in size_list]
            growth = by_size[hi].figures[name] / by_size[lo].figures[name] if by_size[lo].figures[name] else 0
            rows.append([name, str(runs), *map(fmt, values), f"{growth:.2f}x", TARGETS.get(name, "")])
    console.print(rich_table("local store at scale", cols, rows, left={"figure", "target"}))
    section = [
        "## Local store at scale",
        "",
        f"`python bench/scale_bench.py --sizes {sizes} --layouts {layouts}`: {minutes:.0f} min. "
        "Each case is a fresh store (`mmstore serve`, `MMSTORE_WORKERS=2`, fsync on, root on the real "
        "disk) filled with distinct 64x64 PNGs spread over the runs, then measured; the last columns "
        "give each figure's growth from the smallest to the largest size and the issue's target.",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, Linux {info['kernel']}, "
        f"Python {info['python']}. Date: {info['date']}. Load average before/after: {load_before} / "
        f"{load_after}: other work on the machine shows there, and makes absolute times and growth "
        "factors noisy (compare runs made at a similar load).",
        "",
        *md_table(cols, rows, left={"figure", "target"}),
        "",
        "How each figure is measured:",
        "",
        f"- PUT rate: {concurrency} concurrent httpx clients uploading every image once "
        "(`PUT /v1/runs/{run}/blobs/{digest}`: digest check, full decode, fsync of blob, folder and "
        "index).",
        "- GET / HEAD: 4 concurrent clients, 4,000 requests over random stored blobs (after 500 "
        "warm-up GETs), client-side latency (includes httpx's own ~0.3 ms).",
        "- list runs: one `GET /v1/runs`; page: `GET /v1/runs/{run}/blobs?limit=50` from a cursor "
        "51 blobs before the run's end.",
        "- restart: stop the server, start it, until `/healthz` answers.",
        f"- DELETE: `DELETE /v1/runs/{{run}}` for half the runs (the one run of a 1-run layout: all "
        f"its links) while {uploaders} clients keep uploading new images one after another; per "
        "link = wall time / links, pauses between batches included. GC: `POST /v1/gc` (grace 0) "
        "right after, under the same uploads. Longest PUT: the slowest of those uploads (the write "
        "outage a client sees), counting the uploads started once the DELETE or GC began (they start "
        "0.2 s before it: the first uploads after the restart wait 100-500 ms on cold workers).",
        "- WAL: `index.sqlite3-wal` right after GC. Disk per image: blocks allocated under `blobs/` "
        "per image stored; inodes: files plus fan-out folders per image; index: `index.sqlite3` per "
        "image (all three once filled, before any deletion).",
        "",
    ]
    if output is not None:
        write_section(output, "scale_bench", "\n".join(section) + "\n")
        console.print(f"wrote the scale_bench section of {output}")


@app.command()
def main(
    sizes: Annotated[str, typer.Option(help="comma-separated store sizes (images)")] = "10000,100000",
    layouts: Annotated[str, typer.Option(help="comma-separated run counts the images spread over")] = "100,1",
    concurrency: Annotated[int, typer.Option(help="concurrent uploads while filling")] = 16,
    uploaders: Annotated[int, typer.Option(help="clients uploading during DELETE and GC")] = 4,
    output: OutputOption = RESULTS,
    write: WriteOption = True,
    keep_tmp: KeepTmpOption = False,
) -> None:
    interrupt_on(signal.SIGTERM, signal.SIGHUP)
    size_list = [int(s) for s in sizes.split(",")]
    layout_list = [int(s) for s in layouts.split(",")]
    info = machine()
    load_before = loadavg()
    tmp = Path(tempfile.mkdtemp(prefix="mmstore-scale-"))  # the store's roots: the real disk
    stack = Stack(tmp)
    cases = []
    started = time.monotonic()
    with cleanup(stack, [tmp], keep_tmp):
        for runs in layout_list:
            for size in size_list:
                case = Case(size, runs)
                console.print(f"{size:,} images in {runs} run(s) ...")
                t = time.monotonic()
                run_case(case, tmp, stack, concurrency, uploaders)
                console.print(f"  done in {time.monotonic() - t:.0f} s: {json.dumps(case.figures)}")
                cases.append(case)
    minutes = (time.monotonic() - started) / 60
    report(cases, info, load_before, loadavg(), minutes, concurrency, uploaders, output if write else None)


if __name__ == "__main__":
    sys.exit(app())
