"""mmstore vs nginx, side by side in one run: blob GET and verified PUT throughput.

Run: ``.venv/bin/python bench/store_bench.py`` (or ``make bench``). Installs nginx and wrk with
apt-get when they are missing, generates incompressible random-noise PNGs (~100 KB and ~2 MB),
serves the same files from nginx (1 worker, sendfile) and from ``mmstore serve`` subprocesses
(fresh temporary roots on free ports), drives every case with ``wrk -t1 -c16 --latency`` and a
Lua script, prints the table and rewrites the ``## Store`` section of ``bench/RESULTS.md``
(only the text between the ``store_bench`` markers; other sections are kept).

GET: 64 distinct blobs per size, the Lua script rotates over their URLs; nginx serves the same
bytes from a root laid out with the same paths (``/v1/blobs/blake3:<hex>``).
PUT: every request uploads a DISTINCT pre-generated image under its digest (digest check, full
decode, fsync): new blobs, no dedup hits (checked by counting the blobs on disk afterwards). The
dedup path (re-uploading stored bytes) is its own row.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import s3_compare
import typer
from benchlib import (
    RESULTS,
    OutputOption,
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
from mmstore_rollout.stack import Service, Stack, entry_point, free_port, store_service, wait_ready
from rich.table import Table

add_to_path("clients")  # mmstore_client, if the venv lacks it
from mmstore_client.digest import compute_digest  # noqa: E402

RUN = "bench"
GET_TARGET = 0.5  # mmstore GET req/s >= 50% of nginx's
PUT_TARGET_MBPS = 200.0  # PUT of 2 MB images >= 200 MB/s

# (label, width, height): RGB, 3 bytes a pixel, plus one filter byte a row.
SIZES = {"100KB": (185, 185), "2MB": (836, 836)}

app = make_app(__doc__)


# --------------------------------------------------------------------------- images


def _chunk(kind: bytes, data: bytes | memoryview) -> list[bytes | memoryview]:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return [struct.pack(">I", len(data)), kind, data, struct.pack(">I", crc)]


def noise_png(width: int, height: int, seed: int) -> bytes:
    """A valid RGB PNG of random noise: incompressible, distinct for each seed.

    Written directly (PIL's encoder spends ~80 ms per 2 MB trying to compress noise): random
    filtered rows with filter types 0/1/2/4 in the proportions PIL's adaptive filter picks for
    noise (so decoding costs what it costs for a PIL-encoded image: every row is unfiltered),
    stored deflate blocks (what any encoder ends with on noise), IDAT split in 64 KB chunks as
    PIL writes it.
    """
    rng = np.random.default_rng(seed)
    rows = np.frombuffer(bytearray(rng.bytes(height * (width * 3 + 1))), np.uint8).reshape(height, -1)
    rows[:, 0] = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=height, p=[0.29, 0.27, 0.26, 0.18])
    z = memoryview(zlib.compress(rows, 0))
    parts: list[bytes | memoryview] = [b"\x89PNG\r\n\x1a\n"]
    parts += _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    for i in range(0, len(z), 65536):
        parts += _chunk(b"IDAT", z[i : i + 65536])
    parts += _chunk(b"IEND", b"")
    return b"".join(parts)


@dataclass
class ImageSet:
    name: str
    size_label: str
    manifest: Path  # lines "<digest> <file>"
    digests: list[str]
    files: list[Path]
    nbytes: int  # total

    @property
    def mean_size(self) -> float:
        return self.nbytes / len(self.digests)


def make_set(directory: Path, name: str, size_label: str, count: int, seed_base: int) -> ImageSet:
    directory.mkdir(parents=True, exist_ok=True)
    w, h = SIZES[size_label]
    digests, files, total = [], [], 0
    for i in range(count):
        data = noise_png(w, h, seed_base + i)
        d = compute_digest(data)
        f = directory / d.split(":", 1)[1]
        f.write_bytes(data)
        digests.append(d)
        files.append(f)
        total += len(data)
    if len(set(digests)) != count:
        raise RuntimeError(f"{name}: duplicate images generated")
    manifest = directory.parent / f"{name}.manifest"
    manifest.write_text("".join(f"{d} {f}\n" for d, f in zip(digests, files, strict=True)))
    return ImageSet(name, size_label, manifest, digests, files, total)


# --------------------------------------------------------------------------- tools


def ensure_tools() -> None:
    missing = [pkg for pkg in ("nginx", "wrk") if not shutil.which(pkg)]
    if not missing:
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    if sudo and not shutil.which("sudo"):
        raise SystemExit(
            f"missing {missing} and not root: install them with apt-get install -y {' '.join(missing)}"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [*sudo, "apt-get", "install", "-y", *missing]
    console.print(f"[yellow]missing {', '.join(missing)}: running[/] {shlex.join(install)}")
    if subprocess.run(install, env=env).returncode != 0:
        update = [*sudo, "apt-get", "update"]
        console.print(f"[yellow]install failed; running[/] {shlex.join(update)} [yellow]and retrying[/]")
        subprocess.run(update, env=env, check=True)
        subprocess.run(install, env=env, check=True)
    still = [pkg for pkg in missing if not shutil.which(pkg) and not Path("/usr/sbin", pkg).exists()]
    if still:
        raise SystemExit(f"could not install {still}")


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


NGINX_CONF = """\
{user}worker_processes {workers};
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    default_type application/octet-stream;
    keepalive_requests 100000000;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


CEILING = "uvicorn bare ASGI w1"
# The most one uvicorn server can answer on this machine: a bare ASGI app returning a constant
# body from memory (no lookup, no file, no metrics), run as mmstore runs it (uvloop, httptools).
CEILING_APP = """\
import os

BODY = b"x" * int(os.environ["CEILING_BYTES"])
HEADERS = [(b"content-type", b"image/png"), (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
"""


# --------------------------------------------------------------------------- wrk

LUA_COMMON = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
issued = 0
function done(summary, latency, requests)
  local n = 0
  for _, t in ipairs(threads) do n = n + (t:get("issued") or 0) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "issued": %d, '
    .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}\\n',
    summary.requests, summary.duration, summary.bytes, n,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""

# GET: requests pre-formatted once, rotating over the set's URLs.
LUA_GET = (
    LUA_COMMON
    + """
local reqs = {}
local i = 0
function init(args)
  for line in io.lines(args[1]) do
    local digest = line:match("^(%S+)")
    reqs[#reqs + 1] = wrk.format("GET", "/v1/blobs/" .. digest)
  end
end
function request()
  i = i % #reqs + 1
  issued = issued + 1
  return reqs[i]
end
"""
)

# PUT: the next image of the manifest under its own digest; every request is formatted once in
# init (LuaJIT's GC64 heap holds the ~2 GB), so the load generator spends nothing per request but
# the socket write, as for GET. Wraps (dedup hits) only if exhausted.
LUA_PUT = (
    LUA_COMMON
    + """
local reqs = {}
local i = 0
local headers = {["Content-Type"] = "application/octet-stream"}
function init(args)
  local run = args[2] or "bench"
  for line in io.lines(args[1]) do
    local d, f = line:match("^(%S+) (.+)$")
    local fh = assert(io.open(f, "rb"))
    reqs[#reqs + 1] = wrk.format("PUT", "/v1/runs/" .. run .. "/blobs/" .. d, headers, fh:read("*a"))
    fh:close()
  end
end
function request()
  i = i % #reqs + 1
  issued = issued + 1
  return reqs[i]
end
"""
)


@dataclass
class Result:
    server: str
    op: str
    size: str
    req_s: float
    mb_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    note: str = ""
    ratio: float | None = None
    target: str = ""
    extra: dict = field(default_factory=dict)
    rounds: list[float] = field(default_factory=list)  # GET: req/s of every round (this row: the median)


class Wrk:
    def __init__(
        self, tmp: Path, imgs: Path, threads: int, connections: int, duration: float, timeout: str
    ) -> None:
        self.tmp, self.imgs = tmp, imgs
        self.threads, self.connections, self.duration, self.timeout = threads, connections, duration, timeout
        (tmp / "get.lua").write_text(LUA_GET)
        (tmp / "put.lua").write_text(LUA_PUT)
        self.commands: list[str] = []

    def run(
        self, url: str, script: str, args: list[str], duration: float | None = None, record: bool = True
    ) -> dict:
        d = duration or self.duration
        cmd = [
            "wrk", f"-t{self.threads}", f"-c{self.connections}", f"-d{max(1, round(d))}s",
            "--latency", "--timeout", self.timeout, "-s", str(self.tmp / script), url, "--", *args,
        ]  # fmt: skip
        if record:
            self.commands.append(
                shlex.join(cmd).replace(str(self.tmp), "$TMP").replace(str(self.imgs), "$IMG")
            )
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
        if out.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return json.loads(line[len("WRKJSON ") :])


def to_result(server: str, op: str, s: ImageSet, w: dict, note: str = "") -> Result:
    secs = w["duration_us"] / 1e6
    errors = sum(w["errors"].values())
    return Result(
        server=server,
        op=op,
        size=s.size_label,
        req_s=w["requests"] / secs,
        mb_s=w["requests"] * s.mean_size / secs / 1e6,
        p50_ms=w["p50_us"] / 1e3,
        p99_ms=w["p99_us"] / 1e3,
        requests=w["requests"],
        errors=errors,
        note=note,
        extra=w,
    )


def count_blobs(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root / "blobs"))


# --------------------------------------------------------------------------- report


def tools() -> dict[str, str]:
    """The versions of nginx and wrk, for the section's Machine line."""
    return {
        "nginx": tool_version([nginx_bin(), "-v"]).replace("nginx version: ", ""),
        "wrk": tool_version(["wrk", "-v"]).split(" [")[0],
    }


def fmt_ratio(r: Result) -> str:
    return f"{r.ratio:.0%}" if r.ratio is not None else ""


COLS = ["server", "op", "size", "req/s", "MB/s", "p50 ms", "p99 ms", "vs nginx", "target", "note"]


def cells(r: Result) -> list[str]:
    return [
        r.server, r.op, r.size, f"{r.req_s:,.0f}", f"{r.mb_s:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
        fmt_ratio(r), r.target, r.note,
    ]  # fmt: skip


def console_table(results: list[Result]) -> Table:
    left = ("server", "op", "note", "target")
    return rich_table("mmstore vs nginx (wrk, loopback)", COLS, [cells(r) for r in results], left)


def markdown(results: list[Result], info: dict, settings: dict, s3_rows: list) -> str:
    lines = [
        "## Store",
        "",
        "mmstore vs nginx serving the same files, measured side by side in one run of "
        "`bench/store_bench.py` (`make bench`); loopback, wrk and the servers share the machine's "
        "cores. MB/s counts image payload bytes (10^6 B), not headers. Targets (issue): GET >= 50% "
        "of nginx's req/s, PUT of 2 MB images >= 200 MB/s.",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, Linux "
        f"{info['kernel']}, Python {info['python']}, {info['nginx']}, {info['wrk']}. "
        f"Date: {info['date']}. Load average before/after: {settings['load_before']} / "
        f"{settings['load_after']} (shared machine: other processes may compete for the cores).",
        "",
        *md_table(
            [*COLS[:7], "vs nginx req/s", *COLS[8:]],
            [cells(r) for r in results],
            left=("server", "op", "size", "target", "note"),
        ),
        "",
        "Settings:",
        "",
        f"- Images: random-noise RGB PNGs, {settings['sizes']}; {settings['get_images']} distinct "
        "images per size for GET (the Lua script rotates over their URLs; nginx serves the same "
        "bytes at the same paths). Rows of filter types 0/1/2/4 in PIL's adaptive proportions, "
        "stored deflate, 64 KB IDAT chunks: every upload is fully decoded at about the cost of a "
        "PIL-encoded noise image.",
        f"- PUT: {settings['put_desc']}; each request uploads a distinct image under its digest "
        "(`PUT /v1/runs/bench/blobs/blake3:<hex>`: digest check, full decode, fsync of blob, "
        "directory and SQLite index): new blobs, counted on disk after each case. The dedup row "
        "re-uploads bytes already stored (digest check + link, no decode, no blob write).",
        f"- GET: every server runs at once; {settings['get_rounds']} rounds each measure all of them in "
        "turn (the order rotated from round to round), so a slow spell of the shared machine hits "
        "them alike; each row is the server's median round, the note lists every round's req/s.",
        f"- wrk: {settings['wrk']}, {settings['warmup']} s warm-up per GET case (not counted). "
        "p50/p99 are wrk's (`--latency`).",
        f"- nginx: `{settings['nginx_cmd']}` with worker_processes 1 and 2 (`nginx w1`, `nginx w2`; "
        "every mmstore row is compared with the faster of the two), sendfile on, access_log off, "
        "keepalive_requests 100000000, default_type application/octet-stream.",
        f"- mmstore: `{settings['mmstore_cmd']}` with a fresh temporary root on the same disk "
        "(`MMSTORE_FSYNC=true`); `w1`/`w2` = `MMSTORE_WORKERS=1`/`2`, `no-fastpath` = "
        "`MMSTORE_FAST_BLOB_PATH=false` (GET through FastAPI's route).",
        "- uvicorn bare ASGI: `python -m uvicorn ceiling_app:app` (one worker, uvloop + httptools as "
        "mmstore runs) answering every GET with a constant body of the size from memory: what one "
        "uvicorn worker can serve at all on this machine, the ceiling for `mmstore w1`.",
        "- Commands (`$TMP`: the run's temporary directory on disk, `$IMG`: its image directory on tmpfs):",
        "",
        "```",
        *settings["commands"],
        "```",
    ]
    if s3_rows:
        lines += [
            "",
            "### On S3 (moto): mmstore vs the object store directly",
            "",
            "The S3 backend (`mmstore serve --storage s3://bucket/store`, 1 worker) on a moto S3 "
            "server process, against the same operations sent straight to that server. Target "
            f"(issue): mmstore's p50 latency at most {s3_compare.TARGET:.0%} above the direct path's.",
            "",
            *md_table(
                s3_compare.COLS, [s3_compare.cells(r) for r in s3_rows], left=("op", "path", "target", "note")
            ),
            "",
            "- Both paths use one client library, obstore (the backend's own): `S3Store` on the "
            "bucket for direct, `HTTPStore` on mmstore's URL for mmstore; `clients` concurrent "
            f"loops (asyncio) for {settings['s3_duration']} s per path and case, in "
            f"{settings['s3_rounds']} interleaved rounds (each path in turn, so a slow spell hits all "
            "alike; p50 and p99 over the pooled rounds, each round's p50 in the note), after 1 s of "
            "warm-up for GET.",
            "- GET: the objects mmstore stored for the GET sets (64 per size, uploaded through "
            "mmstore first), read at the same key on both paths. `mmstore`: its defaults, which "
            "stream a blob under 1 MB (its cached info + one ranged GET from the bucket) and answer "
            "a GET of a larger one 307 to a presigned URL that the client follows (as mmstore's "
            "clients do): the bytes skip the replica. `mmstore, streamed`: a second replica on the "
            "bucket with `MMSTORE_REDIRECT_MIN_BYTES=off`, streaming the 2 MB blobs through itself.",
            "- PUT new: distinct images (the PUT sets). mmstore checks the digest, probes the "
            "header, and makes the backend's requests (existence HEAD, guard claim, conditional "
            "create, ref, link, run counter, guard check: race-free across replicas) while the full "
            "decode runs beside them. The reference for the target is `direct, the backend's "
            "requests`: the same requests made in-process by the backend's class, with no HTTP hop, "
            "digest or decode; `direct` is one unconditional PUT of the bytes (the note gives "
            "mmstore against it).",
            "- moto runs every request under one lock (S3's per-request atomicity, which the "
            "backend's conditional writes rely on; as in the tests) and shares the 2 cores with "
            "mmstore and the clients, so at 16 clients both paths queue on it: p50 there is mostly "
            "moto's queue, and mmstore's CPU (decoding, a second copy of each byte) competes with it.",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


@app.command()
def main(
    duration: Annotated[float, typer.Option(help="seconds per measured case")] = 5.0,
    warmup: Annotated[float, typer.Option(help="seconds of warm-up per GET case (0: none)")] = 1.0,
    connections: Annotated[int, typer.Option(help="wrk connections")] = 16,
    threads: Annotated[int, typer.Option(help="wrk threads")] = 1,
    get_images: Annotated[int, typer.Option(help="distinct images per size for GET")] = 64,
    put_small: Annotated[int, typer.Option(help="distinct ~100 KB images for PUT")] = 4000,
    put_large: Annotated[int, typer.Option(help="distinct ~2 MB images for PUT")] = 800,
    put_workers: Annotated[str, typer.Option(help="MMSTORE_WORKERS values to measure PUT with")] = "1,2",
    output: OutputOption = RESULTS,
    write: Annotated[bool, typer.Option(help="rewrite the results file")] = True,
    keep_tmp: Annotated[bool, typer.Option(help="keep the temporary directories")] = False,
    get_rounds: Annotated[int, typer.Option(help="GET rounds over all servers (rows: the median)")] = 3,
    s3_rounds: Annotated[int, typer.Option(help="S3: interleaved rounds over the paths (pooled)")] = 5,
    s3: Annotated[bool, typer.Option(help="also measure mmstore on S3 (moto) vs S3 directly")] = True,
    s3_put_images: Annotated[
        int, typer.Option(help="distinct images per size and creating path, S3 PUT (2 MB ones: in memory)")
    ] = 800,
) -> None:
    """Measure mmstore vs nginx (GET) and mmstore's verified PUT; print and record the table."""
    interrupt_on(signal.SIGTERM, signal.SIGHUP)  # unwind through the finally blocks
    t_start = time.monotonic()
    ensure_tools()
    tmp = Path(tempfile.mkdtemp(prefix="mmstore-bench-"))  # servers' roots: the real disk
    stack = Stack(tmp)
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    imgs = Path(tempfile.mkdtemp(prefix="mmstore-bench-img-", dir=shm))  # PUT bodies: tmpfs
    load_before = loadavg()
    results: list[Result] = []
    with cleanup(stack, [tmp, imgs], keep_tmp):
        # ---- images
        t0 = time.monotonic()
        get_sets = {
            s: make_set(tmp / "images" / s, f"get-{s}", s, get_images, 1_000_000 * k)
            for k, s in enumerate(SIZES, 1)
        }
        put_sets = {
            "100KB": make_set(imgs / "put-100KB", "put-100KB", "100KB", put_small, 10_000_000),
            "2MB": make_set(imgs / "put-2MB", "put-2MB", "2MB", put_large, 20_000_000),
        }
        # nginx root: the same bytes at the same paths as mmstore's URLs
        nroot = tmp / "nginx-root"
        (nroot / "v1" / "blobs").mkdir(parents=True, exist_ok=True)
        for s in get_sets.values():
            for d, f in zip(s.digests, s.files, strict=True):
                os.link(f, nroot / "v1" / "blobs" / d)
        console.print(
            f"images: {get_images}/size for GET, {put_small} x {put_sets['100KB'].mean_size / 1e3:.0f} KB "
            f"+ {put_large} x {put_sets['2MB'].mean_size / 1e6:.2f} MB for PUT in {imgs} "
            f"({time.monotonic() - t0:.1f}s)"
        )

        wrk = Wrk(tmp, imgs, threads, connections, duration, "30s")

        # Every GET server runs at once, and each round measures them all in turn (the order rotating
        # from round to round): a slow spell of this shared machine hits every server alike, and each
        # row is its median round.
        get_servers: list[tuple[str, dict[str, str]]] = []  # (label, base URL for each size)

        # ---- nginx, with 1 and 2 worker processes: each size is compared with nginx's best
        for workers in (1, 2):
            port = free_port()
            conf = tmp / f"nginx-w{workers}.conf"
            conf.write_text(
                NGINX_CONF.format(
                    user="user root;\n" if os.geteuid() == 0 else "",
                    workers=workers,
                    tmp=tmp,
                    port=port,
                    root=nroot,
                )
            )
            nginx_cmd = [nginx_bin(), "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf)]
            console.print(f"[bold]nginx w{workers}[/] on :{port}")
            # ready once it serves a blob (its root, /, answers 403)
            first = f"/v1/blobs/{next(iter(get_sets.values())).digests[0]}"
            name = f"nginx-w{workers}"
            nginx = Service(name, nginx_cmd, port, tmp / f"{name}.log", ready_path=first)
            wait_ready([stack.start(nginx)], 30)
            get_servers.append((f"nginx w{workers}", dict.fromkeys(get_sets, f"http://127.0.0.1:{port}")))

        # ---- the ceiling of one uvicorn worker (a bare ASGI app, constant body from memory)
        (tmp / "ceiling_app.py").write_text(CEILING_APP)
        ceiling = {}
        for size, s in get_sets.items():
            port = free_port()
            cmd = [
                sys.executable, "-m", "uvicorn", "ceiling_app:app", "--app-dir", str(tmp), "--port",
                str(port), "--no-access-log", "--log-level", "warning",
            ]  # fmt: skip
            env = open_env(CEILING_BYTES=str(round(s.mean_size)))
            app_ = Service(f"ceiling-{size}", cmd, port, tmp / f"ceiling-{size}.log", env, ready_path="/")
            wait_ready([stack.start(app_)], 30)
            ceiling[size] = f"http://127.0.0.1:{port}"
        get_servers.append((CEILING, ceiling))

        # ---- mmstore configurations: PUT cases first, on a fresh root; then they serve GET
        configs = [
            # (label, workers, fast path, measure PUT, dedup row)
            ("mmstore w1", 1, True, "1" in put_workers.split(","), True),
            ("mmstore w2", 2, True, "2" in put_workers.split(","), False),
            ("mmstore w1 no-fastpath", 1, False, False, False),
        ]
        for label, workers, fast, do_put, do_dedup in configs:
            port = free_port()
            root = tmp / f"root-{workers}-{int(fast)}"
            env = open_env(
                MMSTORE_WORKERS=str(workers),
                MMSTORE_FAST_BLOB_PATH=str(fast).lower(),
                MMSTORE_FSYNC="true",
            )
            console.print(f"[bold]{label}[/] on :{port} (workers={workers}, fast_blob_path={fast})")
            name = f"mmstore-{workers}-{int(fast)}"
            server = stack.start(store_service(tmp, root=root, port=port, env=env, name=name))
            wait_ready([server], 30)
            base = server.url

            if do_put:
                for s in put_sets.values():
                    before = count_blobs(root)
                    w = wrk.run(base, "put.lua", [str(s.manifest), RUN])
                    created = count_blobs(root) - before
                    r = to_result(label, "PUT new", s, w)
                    dedup = max(0, w["issued"] - len(s.digests))
                    r.note = f"{created} new blobs"
                    if dedup:
                        flag = "--put-small" if s.size_label == "100KB" else "--put-large"
                        r.note += f"; set exhausted: ~{dedup} dedup hits (raise {flag})"
                    if created < r.requests - r.errors:
                        r.note += f"; only {created} of {r.requests} were new"
                    if s.size_label == "2MB":
                        r.target = "met" if r.mb_s >= PUT_TARGET_MBPS else "not met"
                        r.target += f" (>= {PUT_TARGET_MBPS:.0f} MB/s)"
                    results.append(r)
                    console.print(
                        f"  {label} PUT {s.size_label}: {r.req_s:,.0f} req/s {r.mb_s:,.0f} MB/s "
                        f"p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms errors {r.errors}; {r.note}"
                    )

            # the GET sets, uploaded once
            with httpx.Client(base_url=base, timeout=60) as c:
                for s in get_sets.values():
                    for d, f in zip(s.digests, s.files, strict=True):
                        resp = c.put(f"/v1/runs/{RUN}/blobs/{d}", content=f.read_bytes())
                        if resp.status_code not in (200, 201):
                            raise RuntimeError(f"upload failed: {resp.status_code} {resp.text[:300]}")

            if do_dedup:
                for s in get_sets.values():
                    before = count_blobs(root)
                    w = wrk.run(base, "put.lua", [str(s.manifest), RUN + "-dedup"])
                    r = to_result(label, "PUT dedup", s, w, note="bytes already stored (digest + link)")
                    if count_blobs(root) != before:
                        r.note += "; NEW BLOBS appeared?"
                    results.append(r)
                    console.print(
                        f"  {label} PUT dedup {s.size_label}: {r.req_s:,.0f} req/s {r.mb_s:,.0f} MB/s "
                        f"p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms errors {r.errors}"
                    )
            get_servers.append((label, dict.fromkeys(get_sets, base)))

        # ---- GET rounds
        rounds: dict[tuple[str, str], list[Result]] = {}
        for n in range(get_rounds):
            shift = n % len(get_servers)
            turn = get_servers[shift:] + get_servers[:shift]
            names = ", ".join(label for label, _ in turn)
            console.print(f"[bold]GET round {n + 1}/{get_rounds}[/]: {names}")
            for size, s in get_sets.items():
                for label, urls in turn:
                    if warmup > 0:
                        wrk.run(urls[size], "get.lua", [str(s.manifest)], duration=warmup, record=False)
                    w = wrk.run(urls[size], "get.lua", [str(s.manifest)])
                    r = to_result(label, "GET", s, w)
                    rounds.setdefault((label, size), []).append(r)
                    console.print(f"  {label} GET {size}: {r.req_s:,.0f} req/s errors {r.errors}")
        median: dict[tuple[str, str], Result] = {}
        for key, measured in rounds.items():
            r = sorted(measured, key=lambda x: x.req_s)[len(measured) // 2]
            r.rounds = [x.req_s for x in measured]
            median[key] = r
        for size in get_sets:
            best = max((median[(f"nginx w{w}", size)] for w in (1, 2)), key=lambda r: r.req_s)
            best.note = "nginx's best (req/s) for this size: the reference"
            for (label, sz), r in median.items():
                if sz != size or label.startswith("nginx"):
                    continue
                r.ratio = r.req_s / best.req_s
                if label == CEILING:
                    r.note = "constant body from memory, no work: one uvicorn worker's ceiling"
                else:
                    r.target = ("met" if r.ratio >= GET_TARGET else "not met") + f" (>= {GET_TARGET:.0%})"
                    workers = 2 if " w2" in label else 1
                    r.note = f"workers={workers}, fast path {'off' if 'no-fastpath' in label else 'on'}"
        for r in median.values():
            r.note = "; ".join(filter(None, [r.note, "rounds: " + " / ".join(f"{x:,.0f}" for x in r.rounds)]))
        results.extend(median.values())
        for r in results:
            if r.errors and "errors" not in r.note:
                r.note += f"; {r.errors} errors (non-2xx/socket)"
        stack.stop()  # the S3 case must not share the machine with these

        # ---- the S3 backend on moto, against the same operations straight on the S3 server
        s3_rows: list = []
        if s3:
            console.print("[bold]mmstore on S3 (moto) vs direct S3[/]")
            s3_rows, _ = s3_compare.run(
                stack,
                tmp,
                {size: list(zip(s.digests, s.files, strict=True)) for size, s in get_sets.items()},
                list(put_sets),
                lambda size, i: noise_png(*SIZES[size], 30_000_000 + i),
                concurrencies=[1, connections],
                duration=duration,
                rounds=s3_rounds,
                put_limit=s3_put_images,
                console=console,
            )

        # ---- report
        mmstore = entry_point("mmstore", "mmstore.cli")
        order = {"GET": 0, "PUT new": 1, "PUT dedup": 2}
        servers = ["nginx w1", "nginx w2", CEILING, "mmstore w1", "mmstore w2", "mmstore w1 no-fastpath"]
        results.sort(key=lambda r: (order[r.op], r.size != "100KB", servers.index(r.server)))
        console.print(console_table(results))
        settings = {
            "load_before": load_before,
            "load_after": loadavg(),
            "sizes": ", ".join(
                f"{k} = {w}x{h} ({get_sets[k].mean_size / 1e3:,.0f} kB)" for k, (w, h) in SIZES.items()
            ),
            "get_images": get_images,
            "put_desc": f"{put_small} distinct ~100 KB and {put_large} distinct ~2 MB images pre-generated "
            "on tmpfs (the Lua script formats every request once, before the clock starts), "
            f"{duration:g} s per case, "
            f"MMSTORE_WORKERS in {{{put_workers}}}",
            "wrk": f"`wrk -t{threads} -c{connections} -d{max(1, round(duration))}s --latency --timeout 30s`",
            "warmup": f"{warmup:g}",
            "nginx_cmd": "nginx -p $TMP -e $TMP/nginx-error.log -c $TMP/nginx.conf (daemon off)",
            "mmstore_cmd": "MMSTORE_WORKERS=N MMSTORE_FAST_BLOB_PATH=true|false "
            f"{Path(mmstore[0]).name if len(mmstore) == 1 else 'python -m mmstore.cli'} "
            "serve --port PORT --root $TMP/root",
            "commands": wrk.commands,
            "s3_duration": f"{duration:g}",
            "s3_rounds": s3_rounds,
            "get_rounds": get_rounds,
        }
        info = {**machine(), **tools()}
        if write:
            write_section(output, "store_bench", markdown(results, info, settings, s3_rows))
            console.print(f"wrote the Store section of {output}")
        console.print(f"done in {time.monotonic() - t_start:.0f}s")


if __name__ == "__main__":
    app()
