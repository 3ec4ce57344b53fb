"""Layout from the header vs the HF processor, and rollout bytes on the wire: refs vs base64 vs pixels.

Run: ``.venv/bin/python bench/layout_bench.py`` (or ``make bench``). Prints two tables and
rewrites the ``## Layout`` section of ``bench/RESULTS.md`` (only the text between the
``layout_bench`` markers; other sections are kept).

1. Time per image. "place from bytes" is what the renderer and the inference service do for an
   image: ``decode.probe(data)`` (header only) + ``layout.place(width, height)``. The HF path is
   what a pipeline shipping processed images does: ``decode.decode_rgb(data)`` (the shared
   decoding rule) + the real ``Qwen2VLImageProcessor`` (default Qwen2-VL config: min_pixels
   56*56, max_pixels 28*28*1280) returning ``pixel_values``. Images: screenshot-like PNGs (UI
   chrome, text, buttons, a photo panel) and photo-like JPEGs (smooth fields plus sensor-like
   noise, quality 90) at 640x480, 1280x720 and 1920x1080, several distinct images per cell. Every
   placement is checked against the processor's ``image_grid_thw``.
2. Bytes on the wire for a 10-turn rollout, one 1280x720 screenshot per turn, where each turn's
   request carries the whole conversation so far (turn k carries k images): as refs (the
   descriptors' JSON exactly as ``/v1/generate`` encodes it, and the bare ``mmstore://`` URIs),
   as base64 data URIs, and as float32 ``pixel_values`` (the real processor's output nbytes).
"""

from __future__ import annotations

import base64
import io
import json
import random
import statistics
import time
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import typer
from benchlib import (
    RESULTS,
    OutputOption,
    WriteOption,
    add_to_path,
    console,
    loadavg,
    machine,
    make_app,
    md_table,
    rich_table,
    write_section,
)
from PIL import Image, ImageDraw, ImageFont
from rich.table import Table

add_to_path("clients")  # mmstore_client, if the venv lacks it
from mmstore_client import decode  # noqa: E402
from mmstore_client.digest import compute_digest, make_ref  # noqa: E402
from mmstore_client.layouts import Layout  # noqa: E402
from mmstore_client.render import describe  # noqa: E402

SPEED_TARGET = 1000.0  # place >= 1000x faster than the HF path
WIRE_TARGET = 10_000.0  # refs >= 10,000x smaller than pixel_values
SIZES = [(640, 480), (1280, 720), (1920, 1080)]
KINDS = {"screenshot PNG": "png", "photo JPEG": "jpeg"}

app = make_app(__doc__)


# --------------------------------------------------------------------------- images

_WORD_TEXT = (
    "file edit view run terminal settings search results commit branch merge request "
    "review pipeline status passed failed build deploy issue comment assignee label "
    "milestone open closed draft update config model train loss reward step epoch batch "
    "token image layout cache store digest fetch render inference checkpoint worker queue "
    "latency throughput"
)
WORDS = _WORD_TEXT.split()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _photo_array(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random colour field (bicubic upsampling of a coarse grid) plus sensor-like noise."""
    cw, ch = max(2, width // 48), max(2, height // 48)
    coarse = Image.fromarray(rng.integers(0, 256, (ch, cw, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    noisy = smooth + rng.normal(0.0, 6.0, smooth.shape).astype(np.float32)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def screenshot_png(width: int, height: int, seed: int) -> bytes:
    """A UI-like screenshot: title bar, tabs, sidebar list, text, buttons, a photo panel."""
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    s = width / 1280  # scale everything with the width
    img = Image.new("RGB", (width, height), (246, 247, 249))
    d = ImageDraw.Draw(img)
    small, body, title = _font(max(9, round(12 * s))), _font(max(10, round(14 * s))), _font(round(20 * s))
    # window chrome
    bar = round(36 * s)
    d.rectangle([0, 0, width, bar], fill=(40, 44, 52))
    for i, c in enumerate([(255, 95, 86), (255, 189, 46), (39, 201, 63)]):
        x = round((14 + 20 * i) * s)
        d.ellipse([x, round(12 * s), x + round(12 * s), round(24 * s)], fill=c)
    d.text((round(90 * s), round(10 * s)), f"mmstore - rollout {seed}", font=body, fill=(220, 223, 228))
    # tabs
    x = round(8 * s)
    for _ in range(rnd.randint(3, 6)):
        label = " ".join(rnd.choice(WORDS) for _ in range(2))
        w = round(d.textlength(label, font=small)) + round(24 * s)
        d.rounded_rectangle(
            [x, bar + 4, x + w, bar + round(28 * s)], 4, fill=(255, 255, 255), outline=(210, 213, 218)
        )
        d.text((x + round(12 * s), bar + round(9 * s)), label, font=small, fill=(60, 64, 72))
        x += w + round(6 * s)
    top = bar + round(34 * s)
    # sidebar
    side = round(220 * s)
    d.rectangle([0, top, side, height], fill=(233, 236, 240))
    y = top + round(10 * s)
    while y < height - round(24 * s):
        icon = tuple(int(v) for v in rng.integers(60, 220, 3))
        d.rectangle([round(12 * s), y + 2, round(26 * s), y + round(16 * s)], fill=icon)
        d.text(
            (round(34 * s), y),
            " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 3))),
            font=body,
            fill=(45, 48, 55),
        )
        y += round(26 * s)
    # main pane: heading, paragraphs, buttons, a table, a photo panel
    x0, y = side + round(24 * s), top + round(16 * s)
    d.text((x0, y), " ".join(rnd.choice(WORDS) for _ in range(4)).title(), font=title, fill=(20, 22, 26))
    y += round(40 * s)
    photo_w, photo_h = round(360 * s), round(220 * s)
    text_right = width - photo_w - round(48 * s)
    for _ in range(rnd.randint(6, 10)):
        line = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(6, 14)))
        while d.textlength(line, font=body) > text_right - x0 and " " in line:
            line = line.rsplit(" ", 1)[0]
        d.text((x0, y), line, font=body, fill=(50, 54, 62))
        y += round(22 * s)
    y += round(10 * s)
    bx = x0
    for _ in range(3):
        label = rnd.choice(WORDS).title()
        w = round(d.textlength(label, font=body)) + round(32 * s)
        color = tuple(int(v) for v in rng.integers(30, 200, 3))
        d.rounded_rectangle([bx, y, bx + w, y + round(32 * s)], round(6 * s), fill=color)
        d.text((bx + round(16 * s), y + round(8 * s)), label, font=body, fill=(255, 255, 255))
        bx += w + round(12 * s)
    y += round(52 * s)
    row = round(24 * s)
    while y + row < height - round(16 * s):
        d.line([x0, y + row, width - round(24 * s), y + row], fill=(220, 222, 226))
        cx = x0
        for col in range(4):
            cell = rnd.choice(WORDS) if col else f"#{rnd.randint(100, 99999)}"
            d.text((cx, y + round(5 * s)), cell, font=small, fill=(70, 74, 82))
            cx += round(170 * s)
        y += row
    px, py = width - photo_w - round(24 * s), top + round(56 * s)
    img.paste(Image.fromarray(_photo_array(photo_w, photo_h, rng)), (px, py))
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # PIL's default compression, as a screenshot tool would write
    return buf.getvalue()


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_photo_array(width, height, np.random.default_rng(seed))).save(
        buf, format="JPEG", quality=90
    )
    return buf.getvalue()


def make_image(kind: str, width: int, height: int, seed: int) -> bytes:
    return screenshot_png(width, height, seed) if KINDS[kind] == "png" else photo_jpeg(width, height, seed)


# --------------------------------------------------------------------------- measuring


@dataclass
class SpeedRow:
    kind: str
    size: str
    images: int
    mean_bytes: float
    place_us: float  # median per image of probe + place
    probe_us: float
    decode_ms: float  # median of the HF path's parts
    process_ms: float
    hf_ms: float  # median of decode + process (per call)
    tokens: int
    pv_mb: float

    @property
    def ratio(self) -> float:
        return self.hf_ms * 1e3 / self.place_us


def processor_output(processor, img: Image.Image):
    return processor(images=[img], return_tensors="pt")


def measure_speed(
    kind: str,
    size: tuple[int, int],
    images: list[bytes],
    layout: Layout,
    processor,
    place_reps: int,
    hf_reps: int,
) -> SpeedRow:
    place_t, probe_t, dec_t, proc_t, hf_t = [], [], [], [], []
    tokens, pv = 0, 0
    for data in images:
        # header path
        per = []
        per_probe = []
        for _ in range(place_reps):
            t0 = time.perf_counter_ns()
            header = decode.probe(data)
            t1 = time.perf_counter_ns()
            placement = layout.place(header.width, header.height)
            t2 = time.perf_counter_ns()
            per.append(t2 - t0)
            per_probe.append(t1 - t0)
        place_t.append(statistics.median(per) / 1e3)
        probe_t.append(statistics.median(per_probe) / 1e3)
        # HF path (one untimed call first: lazy imports, allocator warm-up)
        out = processor_output(processor, decode.decode_rgb(data))
        grid = tuple(int(v) for v in out["image_grid_thw"][0])
        if grid != tuple(placement.grid):
            raise RuntimeError(f"{kind} {size}: layout grid {placement.grid} != processor grid {grid}")
        pv = out["pixel_values"].numel() * out["pixel_values"].element_size()
        tokens = placement.num_tokens
        d_per, p_per, h_per = [], [], []
        for _ in range(hf_reps):
            t0 = time.perf_counter_ns()
            img = decode.decode_rgb(data)
            t1 = time.perf_counter_ns()
            out = processor_output(processor, img)
            t2 = time.perf_counter_ns()
            d_per.append(t1 - t0)
            p_per.append(t2 - t1)
            h_per.append(t2 - t0)
        dec_t.append(statistics.median(d_per) / 1e6)
        proc_t.append(statistics.median(p_per) / 1e6)
        hf_t.append(statistics.median(h_per) / 1e6)
    return SpeedRow(
        kind=kind,
        size=f"{size[0]}x{size[1]}",
        images=len(images),
        mean_bytes=sum(map(len, images)) / len(images),
        place_us=statistics.median(place_t),
        probe_us=statistics.median(probe_t),
        decode_ms=statistics.median(dec_t),
        process_ms=statistics.median(proc_t),
        hf_ms=statistics.median(hf_t),
        tokens=tokens,
        pv_mb=pv / 1e6,
    )


def _json_len(obj) -> int:
    """Bytes of ``obj`` as httpx encodes a JSON body (compact separators, UTF-8)."""
    return len(json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode())


@dataclass
class WireRow:
    kind: str
    representation: str
    per_image: float  # mean bytes per image occurrence
    total: int  # over the whole rollout
    note: str = ""


def measure_wire(kind: str, turns: int, layout: Layout, processor, seed: int) -> tuple[list[WireRow], dict]:
    width, height = 1280, 720
    blobs = [make_image(kind, width, height, seed + t) for t in range(turns)]
    descs, uris, pv_bytes = [], [], []
    for data in blobs:
        digest = compute_digest(data)
        descs.append(describe(digest, decode.probe(data), layout))
        uris.append(make_ref(digest))
        out = processor_output(processor, decode.decode_rgb(data))
        pv_bytes.append(out["pixel_values"].numel() * out["pixel_values"].element_size())
    mime = decode.probe(blobs[0]).mime
    data_uris = [f"data:{mime};base64," + base64.b64encode(b).decode() for b in blobs]
    dumped = [d.model_dump(mode="json", exclude_none=True) for d in descs]
    occurrences = turns * (turns + 1) // 2  # turn k carries k images
    totals = {
        "refs: descriptors JSON": sum(_json_len(dumped[:k]) for k in range(1, turns + 1)),
        "refs: bare ref URIs": sum(len(u.encode()) for k in range(1, turns + 1) for u in uris[:k]),
        "base64 data URIs": sum(len(u) for k in range(1, turns + 1) for u in data_uris[:k]),
        "pixel_values float32": sum(pv for k in range(1, turns + 1) for pv in pv_bytes[:k]),
    }
    notes = {
        "refs: descriptors JSON": "the `descriptors` array of each /v1/generate body",
        "refs: bare ref URIs": "`mmstore://blobs/blake3:<hex>`, 87 B each",
        "base64 data URIs": f"`data:{mime};base64,...`",
        "pixel_values float32": "the processor's output tensor (image_grid_thw not counted)",
    }
    rows = [WireRow(kind, rep, tot / occurrences, tot, notes[rep]) for rep, tot in totals.items()]
    raw = sum(map(len, blobs))
    rows.append(
        WireRow(
            kind, "raw bytes, once per image", raw / turns, raw, "offload PUT to the store (not per turn)"
        )
    )
    meta = {
        "occurrences": occurrences,
        "tokens": descs[0].num_tokens,
        "grid": list(descs[0].grid),
        "desc_json": _json_len(dumped[0]),
    }
    return rows, meta


# --------------------------------------------------------------------------- report


def speed_target(r: SpeedRow) -> str:
    return ("met" if r.ratio >= SPEED_TARGET else "not met") + f" (>= {SPEED_TARGET:,.0f}x)"


def wire_ratio(rows: list[WireRow], r: WireRow) -> str:
    pv = next(x for x in rows if x.kind == r.kind and x.representation == "pixel_values float32")
    if r.representation == "pixel_values float32":
        return "1x"
    return f"{pv.total / r.total:,.0f}x"


def wire_target(rows: list[WireRow], r: WireRow) -> str:
    if not r.representation.startswith("refs"):
        return ""
    pv = next(x for x in rows if x.kind == r.kind and x.representation == "pixel_values float32")
    return ("met" if pv.total / r.total >= WIRE_TARGET else "not met") + f" (>= {WIRE_TARGET:,.0f}x)"


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


SPEED_COLS = [
    "kind",
    "size",
    "file",
    "tokens",
    "place us",
    "(probe us)",
    "decode ms",
    "process ms",
    "HF ms",
    "HF/place",
    "target",
]
SPEED_MD_COLS = [
    "kind",
    "size",
    "file",
    "tokens",
    "place from bytes (us)",
    "of which probe (us)",
    "decode (ms)",
    "HF process (ms)",
    "HF path (ms)",
    "HF / place",
    "target",
]
WIRE_COLS = ["kind", "representation", "per image", "rollout total", "pixel_values / this", "target", "note"]


def speed_cells(r: SpeedRow) -> list[str]:
    return [
        r.kind,
        r.size,
        _bytes(r.mean_bytes),
        str(r.tokens),
        f"{r.place_us:.1f}",
        f"{r.probe_us:.1f}",
        f"{r.decode_ms:.2f}",
        f"{r.process_ms:.2f}",
        f"{r.hf_ms:.2f}",
        f"{r.ratio:,.0f}x",
        speed_target(r),
    ]


def wire_cells(rows: list[WireRow], r: WireRow) -> list[str]:
    return [
        r.kind,
        r.representation,
        _bytes(r.per_image),
        _bytes(r.total),
        wire_ratio(rows, r) if not r.representation.startswith("raw") else "",
        wire_target(rows, r),
        r.note,
    ]


def console_tables(speed: list[SpeedRow], wire: list[WireRow]) -> list[Table]:
    t = rich_table(
        "place from bytes vs HF decode+process (median per image)",
        SPEED_COLS,
        [speed_cells(r) for r in speed],
        left=("kind", "size", "target"),
    )
    w = rich_table(
        "10-turn rollout, 1280x720, turn k carries k images: bytes on the wire",
        WIRE_COLS,
        [wire_cells(wire, r) for r in wire],
        left=("kind", "representation", "target", "note"),
    )
    return [t, w]


def markdown(speed: list[SpeedRow], wire: list[WireRow], info: dict, settings: dict) -> str:
    lines = [
        "## Layout",
        "",
        "What the renderer and the inference service compute per image (the header's size through "
        "the layout) against what a pipeline shipping processed images computes (decode + HF image "
        "processor), and the bytes a multi-turn rollout puts on the wire in each representation. "
        "One run of `bench/layout_bench.py` (`make bench`). Targets (issue): place >= 1000x faster "
        "than the HF path; refs >= 10,000x smaller than pixel_values.",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, Linux {info['kernel']}, "
        f"Python {info['python']}, {settings['versions']}. Date: {info['date']}. Load average "
        f"before/after: {settings['load_before']} / {settings['load_after']} (shared machine: other "
        "processes compete for the cores; the HF path, which uses torch's threads, suffers more than "
        "the single-threaded header path).",
        "",
        "### Time per image",
        "",
        *md_table(SPEED_MD_COLS, [speed_cells(r) for r in speed], left=("kind", "size", "target")),
        "",
        "### Bytes on the wire, one rollout",
        "",
        f"10 turns, one new 1280x720 image per turn, each request carries the conversation so far "
        f"(turn k carries k images: {settings['occurrences']} image occurrences). Each image is "
        f"{settings['tokens']} tokens (grid {settings['grid']}); one descriptor is "
        f"{settings['desc_json']} B of JSON.",
        "",
        *md_table(
            WIRE_COLS, [wire_cells(wire, r) for r in wire], left=("kind", "representation", "target", "note")
        ),
        "",
        "Notes:",
        "",
    ]
    png = [r for r in speed if r.kind == "screenshot PNG"]
    jpeg = [r for r in speed if r.kind == "photo JPEG"]
    slow = [r for r in png if r.probe_us > 0.2 * r.decode_ms * 1e3]
    if slow:
        lines.append(
            "- `decode.probe` of a PNG is not header-only: "
            + ", ".join(f"{r.size} {r.probe_us / 1e3:.1f} ms" for r in slow)
            + f" (JPEG: {statistics.median(r.probe_us for r in jpeg):.0f} us at every size). PIL's "
            "`PngImageFile.getexif()`, called by `probe` for the EXIF orientation, runs `load()` (a full "
            "pixel decode) whenever no eXIf chunk precedes the image data, i.e. for almost every PNG. "
            "It also makes `decode_rgb` decode PNGs twice (its `probe`, then its own `load`), so the "
            "HF path's decode column is about 2x what one PNG decode costs, and the store's `verify` "
            "does the same on every PNG upload."
        )
    floor_us = statistics.median(r.place_us for r in jpeg)
    lines.append(
        f"- With the header path at its JPEG cost ({floor_us:.1f} us: `headers.read` walks the JPEG "
        f"segments to the frame header + `place`), only images whose HF path costs >= "
        f"{floor_us * SPEED_TARGET / 1e3:.1f} ms can reach "
        f"{SPEED_TARGET:,.0f}x; the HF path here costs "
        f"{min(r.hf_ms for r in speed):.1f}-{max(r.hf_ms for r in speed):.1f} ms per image."
    )
    lines += [
        "",
        "Settings:",
        "",
        f"- Images: {settings['images_desc']}",
        "- place from bytes: `decode.probe(data)` (header only: `mmstore_client.headers` reads "
        "well-formed PNG and JPEG headers and their EXIF orientation itself, PIL everything else) + "
        "`layout.place(width, height)` with "
        "the default `qwen2_vl` layout; "
        f"{settings['place_reps']} calls per image, median per image, then the median over the cell's "
        "images. Its grid is checked against the processor's `image_grid_thw` for every image.",
        f"- HF path: `decode.decode_rgb(data)` + `Qwen2VLImageProcessor()(images=[img], "
        f"return_tensors='pt')` (transformers' default class, the torchvision backend; default config "
        f"min_pixels 56*56, max_pixels 28*28*1280; torch threads: {settings['torch_threads']}); one "
        f"untimed call per image, then {settings['hf_reps']} timed calls, median per image, median over "
        "the images. decode and process are the medians of the two parts, HF path the median of "
        "their per-call sum.",
        "- Wire: the descriptors' JSON is encoded as httpx encodes the body of `POST /v1/generate` "
        "(compact separators, UTF-8); token ids are not counted in any row (they are the same in "
        "every representation). pixel_values: `numel * element_size` of the processor's float32 "
        "output for each image. The raw-bytes row is what the refs path moves once per image "
        "(offload; the inference service and trainer then GET each image once by digest).",
        f"- Command: `{settings['command']}`",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


@app.command()
def main(
    images: Annotated[int, typer.Option(help="distinct images per kind and size")] = 3,
    place_reps: Annotated[int, typer.Option(help="timed probe+place calls per image")] = 300,
    hf_reps: Annotated[int, typer.Option(help="timed decode+process calls per image")] = 5,
    turns: Annotated[int, typer.Option(help="turns of the wire-bytes rollout (one image each)")] = 10,
    output: OutputOption = RESULTS,
    write: WriteOption = True,
) -> None:
    """Measure place-from-bytes vs the HF path and a rollout's wire bytes; print and record them."""
    import torch
    import transformers
    from PIL import __version__ as pil_version
    from transformers import Qwen2VLImageProcessor

    t_start = time.monotonic()
    load_before = loadavg()
    layout = Layout.from_config("qwen2_vl")
    processor = Qwen2VLImageProcessor()
    cfg = layout.config
    if (processor.size["shortest_edge"], processor.size["longest_edge"]) != (cfg.min_pixels, cfg.max_pixels):
        raise SystemExit(f"processor size {processor.size} differs from the layout's default {cfg}")

    speed: list[SpeedRow] = []
    for k, kind in enumerate(KINDS):
        for j, (w, h) in enumerate(SIZES):
            t0 = time.monotonic()
            blobs = [make_image(kind, w, h, 1000 * (10 * k + j) + i) for i in range(images)]
            r = measure_speed(kind, (w, h), blobs, layout, processor, place_reps, hf_reps)
            speed.append(r)
            console.print(
                f"  {kind} {r.size}: place {r.place_us:.1f} us, HF {r.hf_ms:.2f} ms "
                f"(decode {r.decode_ms:.2f} + process {r.process_ms:.2f}) -> {r.ratio:,.0f}x "
                f"[{time.monotonic() - t0:.1f}s]"
            )

    wire: list[WireRow] = []
    meta: dict = {}
    for k, kind in enumerate(KINDS):
        rows, m = measure_wire(kind, turns, layout, processor, seed=900_000 + 1000 * k)
        wire += rows
        meta = meta or m

    for t in console_tables(speed, wire):
        console.print(t)
    settings = {
        "load_before": load_before,
        "load_after": loadavg(),
        "versions": f"Pillow {pil_version}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}",
        "torch_threads": torch.get_num_threads(),
        "place_reps": place_reps,
        "hf_reps": hf_reps,
        "images_desc": f"{images} distinct images per kind and size, generated with PIL: screenshot PNGs "
        "(title bar, tabs, sidebar list, text in PIL's FreeType default font, coloured buttons, a table, "
        "a 360x220-scaled photo panel; PIL's default PNG compression) and photo-like JPEGs (bicubic-"
        "upsampled random colour field plus Gaussian noise sigma 6, quality 90).",
        "command": "python bench/layout_bench.py "
        f"--images {images} --place-reps {place_reps} --hf-reps {hf_reps} --turns {turns}",
        **meta,
        "occurrences": turns * (turns + 1) // 2,
    }
    if write:
        write_section(output, "layout_bench", markdown(speed, wire, machine(), settings))
        console.print(f"wrote the Layout section of {output}")
    console.print(f"done in {time.monotonic() - t_start:.0f}s; load average {loadavg()}")


if __name__ == "__main__":
    app()
