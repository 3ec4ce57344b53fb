"""The OpenAI chat endpoint against ``/v1/generate`` and against vLLM's own OpenAI server.

Run: ``.venv/bin/python bench/openai_bench.py`` (about 4 minutes on 2 cores).
Starts a real ``mmstore serve``, a real ``mmstore-inference serve`` and vLLM's OpenAI server
(``python -m vllm.entrypoints.openai.api_server``) on the same tiny checkpoint with the same engine
arguments (float32, ``--enforce-eager``), as subprocesses on free loopback ports, and sends them
the same multi-turn conversations (2 new images a turn, each request carrying the conversation so
far, fixed assistant replies, greedy, a few tokens), one path per set of images:

- ``generate``: ``POST /v1/generate`` with ids the client rendered (refs, images offloaded before);
  the client's render time is reported apart, it is not in the latency;
- ``chat refs``: ``POST /v1/chat/completions`` with mmstore refs: the service renders from scratch;
- ``chat refs+bridge``: the same with ``mmstore.previous_token_ids``: the service bridges;
- ``chat data URIs``: the images inline: the service offloads them, then renders;
- ``vLLM data URIs``: vLLM's own server, the same data URIs (``return_token_ids``);
- ``vLLM plugin refs``: the same server with the mmstore plugin (``VLLM_MEDIA_CONNECTOR=mmstore``),
  mmstore refs instead of data URIs (images offloaded before): stock vLLM as users run it, with refs.

Cold: images new to both servers. Warm: the same conversations again. Blocks of one conversation
rotate over the paths with a pause between blocks (an idle vLLM worker busy-polls for 1 s, and
both engines' workers share the cores). Afterwards vLLM's conversations are sent once more to our
endpoint (as data URIs) to compare the prompt ids and greedy tokens of the two servers. Prints
the tables and rewrites the ``openai_bench`` section of ``bench/RESULTS.md`` (between its markers).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import httpx
import typer
from benchlib import (
    RESULTS,
    KeepTmpOption,
    bench_engine,
    bench_model,
    cleanup,
    engine_text,
    env_prefix,
    interrupt_on,
    loadavg,
    machine,
    make_app,
    md_table,
    med,
    model_text,
    utc_now,
    write_section,
)
from mmstore_rollout.stack import Stack, inference_service, on_gpu, store_service, vllm_service, wait_ready
from PIL import Image, ImageDraw, ImageFilter

RUN = "bench-openai"
PATHS = ("generate", "chat refs", "chat refs+bridge", "chat data URIs", "vLLM data URIs", "vLLM plugin refs")
VLLM_PATHS = ("vLLM data URIs", "vLLM plugin refs")  # vLLM's own server answers these
REF_PATHS = ("generate", "chat refs", "chat refs+bridge", "vLLM plugin refs")  # images offloaded first
REPLY = "Clicked the highlighted item; the list updated."
app = make_app(__doc__)


# --------------------------------------------------------------------------- workload


def screenshot_png(seed: int, size=(1280, 720)) -> bytes:
    """A UI-like PNG: bars, a sidebar list, buttons, text, a noisy picture panel."""
    rnd = random.Random(seed)
    img = Image.new("RGB", size, (245, 245, 247))
    d = ImageDraw.Draw(img)
    w, h = size
    d.rectangle([0, 0, w, 36], fill=(40 + seed % 50, 44, 52))
    d.rectangle([0, 36, 220, h], fill=(228, 230, 235))
    for i in range(18):
        d.text((14, 50 + 34 * i), f"Item {seed % 97}-{i}: {'x' * rnd.randint(4, 14)}", fill=(30, 30, 30))
    for i in range(6):
        x = 250 + 160 * i
        d.rounded_rectangle([x, 60, x + 140, 96], 8, fill=(rnd.randrange(256), 120, 200))
    panel = Image.frombytes("RGB", (180, 110), rnd.randbytes(180 * 110 * 3)).resize((360, 220))
    img.paste(panel, (260, 130))
    for r in range(12):
        d.text(
            (660, 140 + 24 * r), f"row {r} | {rnd.random():.4f} | {rnd.randint(0, 9999)}", fill=(20, 20, 90)
        )
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def photo_jpeg(seed: int, size=(640, 480)) -> bytes:
    rnd = random.Random(seed)
    small = Image.frombytes("RGB", (16, 12), rnd.randbytes(16 * 12 * 3))
    img = small.resize(size, Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    noise = Image.effect_noise(size, 12).convert("RGB")
    img = Image.blend(img, noise, 0.08)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def data_uri(data: bytes) -> str:
    mime = "image/png" if data[:4] == b"\x89PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@dataclass
class Conversation:
    path: str
    index: int
    images: list[list[bytes]]  # per turn: a 1280x720 screenshot PNG and a 640x480 photo JPEG

    def messages(self, turn: int, url) -> list[dict]:
        """The request of turn ``turn`` (0-based): the whole conversation so far."""
        out: list[dict] = []
        for t in range(turn + 1):
            parts = [{"type": "image_url", "image_url": {"url": url(b)}} for b in self.images[t]]
            text = f"Step {t + 1}: what changed on the screen, and what next?"
            out.append({"role": "user", "content": [*parts, {"type": "text", "text": text}]})
            if t < turn:
                out.append({"role": "assistant", "content": REPLY})
        return out


@dataclass
class Result:
    path: str
    phase: str
    conv: int
    turn: int  # 1-based
    latency_s: float
    prompt: list[int]
    tokens: list[int]
    server: dict[str, float]  # the service's timings (ms), when it reports them
    client_render_ms: float = 0.0


class Runner:
    def __init__(self, http: httpx.AsyncClient, urls: dict[str, str], renderer, store, opts: dict) -> None:
        self.http, self.urls, self.renderer, self.store, self.opts = http, urls, renderer, store, opts
        self.eos = renderer.tokenizer.convert_tokens_to_ids(renderer.tokenizer.eos_token)
        self.reply_ids = renderer.tokenizer.encode(REPLY, add_special_tokens=False)

    def ref(self, data: bytes) -> str:
        from mmstore_client.digest import compute_digest, make_ref

        return make_ref(compute_digest(data))

    async def turn(
        self, conv: Conversation, t: int, phase: str, previous: list[int] | None, sampling: dict | None = None
    ) -> Result:
        o = self.opts
        common = sampling or {"max_tokens": o["max_tokens"], "temperature": 0.0}
        render_ms, server = 0.0, {}
        if conv.path == "generate":
            t0 = time.perf_counter()
            from mmstore_client.render import image_refs

            messages = conv.messages(t, self.ref)  # headers kept by digest in the store client
            rendered = await asyncio.to_thread(
                lambda: self.renderer.render(messages, self.store.image_headers(image_refs(messages)))
            )
            render_ms = (time.perf_counter() - t0) * 1e3
            body = {
                "prompt_token_ids": rendered.token_ids,
                "descriptors": [d.model_dump(mode="json") for d in rendered.descriptors],
                "sampling": common | {"logprobs": True},
            }
            url = f"{self.urls['inference']}/v1/generate"
        elif conv.path in VLLM_PATHS:
            messages = conv.messages(t, data_uri if conv.path == "vLLM data URIs" else self.ref)
            body = {
                "model": "tiny",
                "messages": messages,
                "return_token_ids": True,
                "logprobs": True,
            } | common
            url = f"{self.urls['vllm']}/v1/chat/completions"
        else:
            messages = conv.messages(t, data_uri if conv.path == "chat data URIs" else self.ref)
            body = {"model": o["model"], "messages": messages, "logprobs": True} | common
            if conv.path == "chat refs+bridge" and previous is not None:
                body["mmstore"] = {"previous_token_ids": [*previous, *self.reply_ids, self.eos]}
            url = f"{self.urls['inference']}/v1/chat/completions"
        t0 = time.perf_counter()
        r = await self.http.post(url, json=body)
        latency = time.perf_counter() - t0
        r.raise_for_status()
        out = r.json()
        if conv.path == "generate":
            prompt, tokens = out["prompt_token_ids"], out["samples"][0]["token_ids"]
            server = {k: v * 1e3 for k, v in out["timings"].items() if v is not None}
        else:
            prompt, tokens = out["prompt_token_ids"], out["choices"][0]["token_ids"]
            if "mmstore" in out:
                server = {k: v * 1e3 for k, v in out["mmstore"]["timings"].items()}
        return Result(conv.path, phase, conv.index, t + 1, latency, prompt, tokens, server, render_ms)

    async def conversation(self, conv: Conversation, phase: str) -> list[Result]:
        out, previous = [], None
        for t in range(len(conv.images)):
            res = await self.turn(conv, t, phase, previous)
            previous = res.prompt
            out.append(res)
        return out


# --------------------------------------------------------------------------- report


def iqr(xs: list[float]) -> str:
    if len(xs) < 4:
        return "-"
    q = statistics.quantiles(xs, n=4)
    return f"{q[0]:.1f} .. {q[2]:.1f}"


def summary_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    for phase in ("cold", "warm"):
        base = {(r.conv, r.turn): r.latency_s for r in results if r.phase == phase and r.path == "generate"}
        for path in PATHS:
            rs = [r for r in results if r.phase == phase and r.path == path]
            if not rs:
                continue
            lat = [r.latency_s * 1e3 for r in rs]
            diffs = [(r.latency_s - base[(r.conv, r.turn)]) * 1e3 for r in rs if (r.conv, r.turn) in base]
            srv = [r.server for r in rs if r.server]
            rows.append(
                [
                    phase,
                    path,
                    str(len(rs)),
                    f"{med(lat):.1f}",
                    iqr(lat),
                    "" if path == "generate" else f"{med(diffs):+.1f}",
                    f"{med([s.get('offload_s', 0) for s in srv]):.1f}" if "chat" in path else "",
                    f"{med([s.get('render_s', 0) for s in srv]):.1f}" if "chat" in path else "",
                    f"{med([r.client_render_ms for r in rs]):.1f}" if path == "generate" else "",
                    f"{med([s['fetch_s'] for s in srv]):.1f}" if srv else "",
                    f"{med([s['generate_s'] for s in srv]):.1f}" if srv else "",
                ]
            )
    return rows


SUMMARY_COLS = [
    "pass",
    "path",
    "requests",
    "latency p50 ms",
    "IQR ms",
    "vs generate p50 ms",
    "offload ms",
    "render ms",
    "client render ms",
    "fetch ms",
    "vLLM generate ms",
]


def turn_rows(results: list[Result], turns: int) -> list[list[str]]:
    rows = []
    for phase in ("cold", "warm"):
        for t in range(1, turns + 1):
            cells = [phase, str(t), str(2 * t)]
            for path in PATHS:
                rs = [
                    r.latency_s * 1e3 for r in results if r.phase == phase and r.path == path and r.turn == t
                ]
                cells.append(f"{med(rs):.1f}")
            rows.append(cells)
    return rows


LEFT = ("pass", "path")  # the other columns are numbers


def machine_line() -> str:
    m = machine()
    gpu = f"GPU {m['gpu']}, " if m["gpu"] else ""
    return (
        f"{gpu}{m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}, Python {m['python']}"
    )


# --------------------------------------------------------------------------- long conversation

LONG_PATHS = ("chat refs", "chat refs+bridge", "chat data URIs", "vLLM data URIs", "vLLM plugin refs")
STAGE_PATHS = ("chat refs", "chat refs+bridge", "chat data URIs")  # the paths with the service's timings
SPEEDUP_TARGETS = {5: 1.5, 20: 4.0}  # issue: refs at least 1.5x faster at turn 5, 4x at turn 20 (warm)


def overhead_ms(r: Result) -> float:
    """What the service adds to a request over its engine: client latency minus vLLM generate."""
    return r.latency_s * 1e3 - r.server.get("generate_s", 0.0)


def stages_ms(r: Result) -> dict[str, float]:
    """Where a chat request's overhead goes (ms), from the service's ``mmstore.timings``:
    offload; render (headers + template + tokenize, or bridge); engine prep (the generate path's
    fetch and its check of vLLM's expansion); vLLM prep (vLLM's own processing of the prompt: its
    processor-cache lookups and placeholder expansion, which no client of vLLM avoids); server
    rest (the endpoint's own work between them: request checks, decoding, response objects);
    outside (what the service's ``total_s`` does not see: HTTP, the request's JSON parsing and
    validation, the response's serialization, the client's encoding and parsing)."""
    s = r.server
    vllm = s.get("vllm_process_s", 0.0)
    prep = s.get("fetch_s", 0.0) + s.get("process_s", 0.0) - vllm
    known = s.get("offload_s", 0.0) + s.get("render_s", 0.0) + prep + vllm + s.get("generate_s", 0.0)
    total = s.get("total_s", 0.0)
    return {
        "offload": s.get("offload_s", 0.0),
        "render": s.get("render_s", 0.0),
        "engine prep": prep,
        "vLLM prep": vllm,
        "server rest": total - known,
        "outside": r.latency_s * 1e3 - total,
    }


STAGES = ("offload", "render", "engine prep", "vLLM prep", "server rest", "outside")


def long_rows(results: list[Result], turns: int) -> list[list[str]]:
    """Per turn: each path's latency, vLLM's over refs (speedup) and the refs path's overhead."""
    rows = []
    for phase in ("cold", "warm"):
        for t in range(1, turns + 1):
            by = {r.path: r for r in results if r.phase == phase and r.turn == t}
            if "chat refs" not in by or "vLLM data URIs" not in by:
                continue
            refs, theirs = by["chat refs"], by["vLLM data URIs"]
            cells = [phase, str(t), str(2 * t)]
            cells += [f"{by[p].latency_s * 1e3:.1f}" if p in by else "" for p in LONG_PATHS]
            cells += [f"{theirs.latency_s / refs.latency_s:.2f}x"]
            bridged = by.get("chat refs+bridge")
            cells += [f"{overhead_ms(r):.1f}" if r else "" for r in (refs, bridged)]
            rows.append(cells)
    return rows


LONG_COLS = [
    "pass",
    "turn",
    "images",
    *(f"{p} ms" for p in LONG_PATHS),
    "vLLM / refs",
    "refs overhead ms",
    "bridged overhead ms",
]


def stage_rows(results: list[Result], turns: int) -> list[list[str]]:
    """The warm pass's overhead by stage (:func:`stages_ms`) for each of our paths, per turn."""
    rows = []
    for path in STAGE_PATHS:
        for t in range(1, turns + 1):
            r = next((r for r in results if r.phase == "warm" and r.path == path and r.turn == t), None)
            if r is None or not r.server:
                continue
            st = stages_ms(r)
            cells = [path, str(t), f"{r.latency_s * 1e3:.1f}", f"{r.server.get('generate_s', 0.0):.1f}"]
            cells += [f"{overhead_ms(r):.1f}", *(f"{st[k]:.1f}" for k in STAGES)]
            rows.append(cells)
    return rows


STAGE_COLS = ["path", "turn", "latency ms", "vLLM generate ms", "overhead ms", *(f"{k} ms" for k in STAGES)]


def long_verdict(results: list[Result], turns: int) -> list[str]:
    """The issue's targets on the warm pass: speedups at turns 5 and 20, overhead flat 5..20."""
    warm = {(r.path, r.turn): r for r in results if r.phase == "warm"}
    out = []
    for t, target in SPEEDUP_TARGETS.items():
        if ("chat refs", t) in warm and ("vLLM data URIs", t) in warm:
            x = warm[("vLLM data URIs", t)].latency_s / warm[("chat refs", t)].latency_s
            out.append(
                f"turn {t}: refs {x:.2f}x faster than vLLM's server "
                f"(target {target:g}x: {'met' if x >= target else 'NOT met'})"
            )
        if ("vLLM plugin refs", t) in warm and ("vLLM data URIs", t) in warm:
            x = warm[("vLLM data URIs", t)].latency_s / warm[("vLLM plugin refs", t)].latency_s
            out.append(f"turn {t}: vLLM's server with the plugin's refs {x:.2f}x faster than with data URIs")
    for path in ("chat refs", "chat refs+bridge"):
        mid = [overhead_ms(warm[(path, t)]) for t in range(5, turns + 1) if (path, t) in warm]
        if len(mid) > 1:
            out.append(
                f"{path} overhead (latency - vLLM generate) over turns 5..{turns}: "
                f"{min(mid):.1f} .. {max(mid):.1f} ms (median {med(mid):.1f})"
            )
            ours = [
                overhead_ms(warm[(path, t)]) - stages_ms(warm[(path, t)])["vLLM prep"]
                for t in range(5, turns + 1)
                if (path, t) in warm
            ]
            out.append(
                f"{path} overhead without vLLM's own prep (the installed vLLM's processing of the"
                f" prompt) over turns 5..{turns}: {ours[0]:.1f} at turn 5, {ours[-1]:.1f} at turn"
                f" {turns}, {min(ours):.1f} .. {max(ours):.1f} ms (median {med(ours):.1f})"
            )
    return out


# --------------------------------------------------------------------------- throughput

THROUGHPUT_PATHS = ("chat refs", "vLLM data URIs", "vLLM plugin refs")


async def throughput(runner: Runner, store, convs: list[Conversation], max_tokens: int) -> dict[str, float]:
    """Every conversation as a concurrent rollout: turn by turn, each turn's new images uploaded
    first (refs: one PUT each, counted) or sent inline (data URIs); sampled at temperature 1."""
    sampling = {"max_tokens": max_tokens, "temperature": 1.0, "seed": 0}
    results: list[Result] = []

    async def rollout(conv: Conversation) -> None:
        for t in range(len(conv.images)):
            if conv.path in REF_PATHS:
                for data in conv.images[t]:
                    await asyncio.to_thread(store.put, data, RUN)
            results.append(await runner.turn(conv, t, "throughput", None, sampling))

    t0 = time.perf_counter()
    await asyncio.gather(*(rollout(c) for c in convs))
    wall = time.perf_counter() - t0
    images = sum(len(turn) for c in convs for turn in c.images)
    lat = [r.latency_s * 1e3 for r in results]
    return {
        "rollouts": len(convs),
        "requests": len(results),
        "wall_s": wall,
        "images_per_s": images / wall,
        "tokens_per_s": sum(len(r.tokens) for r in results) / wall,
        "prompt_tokens_per_s": sum(len(r.prompt) for r in results) / wall,
        "p50_ms": med(lat),
        "p90_ms": statistics.quantiles(lat, n=10)[-1] if len(lat) > 1 else lat[0],
    }


def throughput_rows(tp: dict[str, dict]) -> list[list[str]]:
    return [
        [
            path,
            str(r["rollouts"]),
            str(r["requests"]),
            f"{r['wall_s']:.1f}",
            f"{r['images_per_s']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['prompt_tokens_per_s']:.0f}",
            f"{r['p50_ms']:.0f}",
            f"{r['p90_ms']:.0f}",
        ]
        for path, r in tp.items()
    ]


THROUGHPUT_COLS = [
    "path",
    "rollouts",
    "requests",
    "wall s",
    "new images/s",
    "generated tokens/s",
    "prompt tokens/s",
    "request p50 ms",
    "request p90 ms",
]


def markdown(results: list[Result], agree: dict, info: dict) -> str:
    o = info["opts"]
    lines = [
        "## OpenAI-compatible endpoint on a GPU" if info["gpu"] else "## OpenAI-compatible endpoint",
        "",
        "Latency per request of `POST /v1/chat/completions` (the service offloads inline images, renders, "
        "then runs the checked generate path) against `POST /v1/generate` with ids the client rendered, "
        "and against vLLM's own OpenAI server given the same images as data URIs, and as mmstore refs "
        "through the mmstore plugin (`vLLM plugin refs`); one run of "
        "`bench/openai_bench.py`. Each path has its own images of the same kinds and sizes "
        "(so every path's cold pass is cold); turn k's request carries the whole conversation, 2k images.",
        "",
        f"Machine: {info['machine']}, {info['versions']}. Date: {info['date']}. Load average before/after: "
        f"{info['load_before']} / {info['load_after']}"
        + (
            "."
            if info["gpu"]
            else " (a shared machine: other engineers' runs compete for the 2 cores, and both servers' "
            "engine workers are pinned to the same core)."
        ),
        "",
        *md_table(SUMMARY_COLS, summary_rows(results), LEFT),
        "",
        "By turn (median latency, ms):",
        "",
        *md_table(["pass", "turn", "images", *PATHS], turn_rows(results, o["turns"]), LEFT),
        "",
        "Agreement:",
        "",
        *[f"- {line}" for line in agree["lines"]],
        "",
        "Reading the numbers:",
        "",
        *[f"- {line}" for line in info["reading"]],
        "",
        "Settings:",
        "",
        f"- Model: {info['model']} (each image is {info['tokens']} tokens), {info['engine']}, "
        f"max_model_len {o['max_model_len']}, `logprobs_mode=processed_logprobs`, seed 0, "
        f"`limit_mm_per_prompt` {o['max_images']} images, on both servers; vLLM's server with "
        "`--generation-config vllm`"
        + (
            ", and `VLLM_ALLOW_LONG_MAX_MODEL_LEN=1` (max_model_len over the config's 32768 positions: "
            "M-RoPE gives an image far fewer positions than tokens)."
            if o["max_model_len"] > 32768
            else "."
        ),
        f"- Workload: {o['convs']} conversations x {o['turns']} turns per path, 2 new images a turn (a "
        "1280x720 screenshot-like PNG, a 640x480 photo-like JPEG), fixed user and assistant texts; greedy, "
        f"max_tokens {o['max_tokens']}, logprobs on. One warm-up conversation per path first (not counted). "
        f"{o['warm_passes']} warm pass(es). Blocks of one conversation rotate over the paths with a "
        f"{o['gap']:g} s pause between blocks.",
        "- Latency: client-measured around one `httpx` POST (body encoding and response parsing included). "
        "offload / render ms: the endpoint's own `mmstore.timings`; fetch and vLLM generate ms: the generate "
        "path's timings inside the service (fetch: GET, verify, decode of the images not cached). client "
        "render ms: what the `generate` path's client spent rendering (descriptors cached by digest, as the "
        "service does), not part of its latency. `chat refs+bridge` sends the previous turn's ids plus the "
        "reply's tokens as `mmstore.previous_token_ids`.",
        f"- Command: `{info['command']}`",
    ]
    if info["long"]:
        lines[lines.index("Agreement:") : lines.index("Agreement:")] = [
            f"A long conversation: one per path, {o['long_turns']} turns, 2 new images a turn (turn "
            f"{o['long_turns']} carries {2 * o['long_turns']}), cold then warm. vLLM's server decodes and "
            "hashes every image of the conversation every turn; the ref paths pay for new images only. "
            "Targets (issue 18, warm): refs at least 1.5x faster at turn 5 and 4x at turn 20, the "
            "refs path's overhead flat from turn 5 on. Overhead = client latency - the service's vLLM "
            "generate time.",
            "",
            *md_table(LONG_COLS, long_rows(info["long"], o["long_turns"]), LEFT),
            "",
            *[f"- {line}" for line in long_verdict(info["long"], o["long_turns"])],
            "",
            "Where the overhead goes (warm pass, ms; see `stages_ms` in the script): offload; render "
            "(headers, template, tokenize or bridge); engine prep (the generate path's fetch and its "
            "check of vLLM's expansion); vLLM prep (vLLM's own processing of the prompt: processor-cache "
            "lookups and placeholder expansion, which every client of that vLLM version pays; see "
            "`bench/vllm_prep_bench.py`); server rest (the endpoint's own work between them); outside "
            "(HTTP, request JSON parsing and validation, response serialization, the client's encoding "
            "and parsing).",
            "",
            *md_table(STAGE_COLS, stage_rows(info["long"], o["long_turns"]), ("path",)),
            "",
        ]
    if info["throughput"]:
        lines[lines.index("Agreement:") : lines.index("Agreement:")] = [
            f"Throughput: {o['rollouts']} concurrent multi-turn rollouts per path, {o['rollout_turns']} "
            "turns each, 2 new images a turn (refs: each new image PUT to the store by the rollout, "
            "counted; data URIs: inline), temperature 1, max_tokens "
            f"{o['rollout_tokens']}; each path with new images, one path after the other.",
            "",
            *md_table(THROUGHPUT_COLS, throughput_rows(info["throughput"]), ("path",)),
            "",
        ]
    return "\n".join(lines) + "\n"


async def bench(opts: dict, stack: Stack, tmp: Path) -> None:
    from mmstore_client import StoreClient
    from mmstore_client.render import Renderer, image_refs

    t_start = time.monotonic()
    load_before = loadavg()
    model = bench_model()
    gpu = on_gpu()
    opts["model"] = model.name
    # every MMSTORE_ setting dropped: the servers run with their defaults, but for the image limit
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSTORE_")}
    env |= {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    env |= {"MMSTORE_INFERENCE_MAX_IMAGES_PER_PROMPT": str(opts["max_images"])}
    if opts["max_model_len"] > 32768:  # Qwen2-VL's config says 32768 positions
        env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    if gpu:  # vLLM's own server needs the sampler setting the service makes for itself
        from mmstore_inference.engine import engine_environment

        engine_environment(True, env)
    engine = bench_engine(opts["max_model_len"])
    urls: dict[str, str] = {}
    store_server = stack.start(store_service(tmp, root=tmp / "root", env=env))
    wait_ready([store_server], 30)
    urls["store"] = store_server.url
    inference = stack.start(inference_service(model, urls["store"], tmp, engine=engine, env=env))
    urls["inference"] = inference.url
    if gpu:  # one at a time: vLLM's memory profiling counts another engine's allocations as its own
        wait_ready([inference], 600)
    vllm_args = ["--served-model-name", "tiny", "--logprobs-mode", "processed_logprobs", "--seed", "0"]
    vllm_args += ["--generation-config", "vllm", "--uvicorn-log-level", "warning"]
    # the plugin as a user enables it: the media connector by name, the store's URL and the model
    # (layout checks); data URIs still go through vLLM's own loader. vLLM's token-in endpoint is not
    # needed here (the chat endpoint is), so no --enable-scale-out, which vLLM 0.26 does not know.
    plugin_env = env | {
        "VLLM_MEDIA_CONNECTOR": "mmstore",
        "MMSTORE_URL": urls["store"],
        "MMSTORE_MODEL": str(model),
    }
    vllm_server = stack.start(
        vllm_service(model, tmp, engine=engine, max_images=opts["max_images"], args=vllm_args, env=plugin_env)
    )
    urls["vllm"] = vllm_server.url
    t0 = time.monotonic()
    wait_ready([inference, vllm_server], 600)
    print(f"servers ready in {time.monotonic() - t0:.0f}s (logs in {tmp})", flush=True)

    store = StoreClient(urls["store"])
    renderer = Renderer.from_pretrained(model)
    t0 = time.monotonic()
    convs: dict[str, list[Conversation]] = {}
    warmups: dict[str, Conversation] = {}
    for k, path in enumerate(PATHS):
        seed = 1000 * (k + 1)
        make = lambda s: [[screenshot_png(s + t), photo_jpeg(s + t)] for t in range(opts["turns"])]  # noqa: E731
        convs[path] = [Conversation(path, c, make(seed + 10 * c)) for c in range(opts["convs"])]
        warmups[path] = Conversation(path, -1, make(seed + 900)[:2])
        if path in REF_PATHS:  # refs: offloaded by the client first
            for conv in [*convs[path], warmups[path]]:
                for turn in conv.images:
                    for data in turn:
                        store.put(data, RUN)
    print(f"workload built in {time.monotonic() - t0:.1f}s", flush=True)

    results: list[Result] = []
    async with httpx.AsyncClient(timeout=300) as http:
        runner = Runner(http, urls, renderer, store, opts)
        for path in PATHS:  # vLLM's first multimodal request is slow, and so is ours
            await runner.conversation(warmups[path], "warmup")
        block = 0
        for phase, passes in (("cold", 1), ("warm", opts["warm_passes"])):
            for _ in range(passes):
                t0 = time.monotonic()
                for c in range(opts["convs"]):
                    order = PATHS[block % len(PATHS) :] + PATHS[: block % len(PATHS)]
                    block += 1
                    for path in order:
                        await asyncio.sleep(opts["gap"])
                        results += await runner.conversation(convs[path][c], phase)
                print(f"{phase} pass: {time.monotonic() - t0:.1f}s", flush=True)

        # agreement: vLLM's conversations through our endpoint, as data URIs
        ours = Conversation("chat data URIs", 0, [])
        same_prompt = same_tokens = n = 0
        for conv in convs["vLLM data URIs"]:
            ours.images = conv.images
            for t in range(opts["turns"]):
                theirs = next(
                    r for r in results if r.path == conv.path and r.conv == conv.index and r.turn == t + 1
                )
                mine = await runner.turn(ours, t, "check", None)
                n += 1
                same_prompt += mine.prompt == theirs.prompt
                same_tokens += mine.tokens == theirs.tokens

        long: list[Result] = []
        if opts["long_turns"]:
            t0 = time.monotonic()
            for k, path in enumerate(LONG_PATHS):
                seed = 100_000 * (k + 1)
                images = [[screenshot_png(seed + t), photo_jpeg(seed + t)] for t in range(opts["long_turns"])]
                conv = Conversation(path, 0, images)
                if path in REF_PATHS:  # refs: offloaded by the client first
                    for turn in images:
                        for data in turn:
                            store.put(data, RUN)
                for phase in ("cold", "warm"):
                    await asyncio.sleep(opts["gap"])
                    long += await runner.conversation(conv, phase)
            print(f"long conversation ({opts['long_turns']} turns): {time.monotonic() - t0:.1f}s", flush=True)
            for line in long_verdict(long, opts["long_turns"]):
                print("  " + line, flush=True)
            for line in md_table(STAGE_COLS, stage_rows(long, opts["long_turns"]), ("path",)):
                print(line, flush=True)

        tp: dict[str, dict] = {}
        if opts["rollouts"]:
            for k, path in enumerate(THROUGHPUT_PATHS):
                seed = 1_000_000 * (k + 1)
                rollouts = [
                    Conversation(
                        path,
                        c,
                        [
                            [screenshot_png(seed + 100 * c + t), photo_jpeg(seed + 100 * c + t)]
                            for t in range(opts["rollout_turns"])
                        ],
                    )
                    for c in range(opts["rollouts"])
                ]
                await asyncio.sleep(opts["gap"])
                tp[path] = await throughput(runner, store, rollouts, opts["rollout_tokens"])
                r = tp[path]
                print(
                    f"throughput {path}: {r['images_per_s']:.1f} new images/s, {r['tokens_per_s']:.0f} "
                    f"generated tokens/s, {r['wall_s']:.1f}s",
                    flush=True,
                )
    # every path's prompts against the client-side renderer (all images are in the store now)
    exact: dict[str, list[bool]] = {p: [] for p in PATHS}
    tokens_per_image: set[int] = set()
    for path in PATHS:
        for conv in convs[path]:
            for turn in conv.images:
                for data in turn:
                    store.put(data, RUN)
            for t in range(opts["turns"]):
                messages = conv.messages(t, runner.ref)
                rendered = renderer.render(messages, store.image_headers(image_refs(messages)))
                tokens_per_image.update(d.num_tokens for d in rendered.descriptors)
                for r in results:
                    if r.path == path and r.conv == conv.index and r.turn == t + 1:
                        exact[path].append(r.prompt == rendered.token_ids)
    store.close()

    agree = {
        "lines": [
            "prompt ids equal to the client-side renderer's, per path: "
            + ", ".join(f"{p} {sum(v)}/{len(v)}" for p, v in exact.items()),
            f"vLLM's server vs this endpoint on the same data URIs: prompt ids equal {same_prompt}/{n}, "
            f"greedy tokens equal {same_tokens}/{n} (this service bans image markup tokens from sampling; "
            "vLLM's server does not)",
        ]
    }
    import torch
    import transformers
    import vllm

    def paired(path: str, other: str, phase: str) -> float:
        """Median over (conversation, turn) of ``path``'s latency minus ``other``'s, in ms."""
        base = {(r.conv, r.turn): r.latency_s for r in results if r.path == other and r.phase == phase}
        return med(
            [
                (r.latency_s - base[(r.conv, r.turn)]) * 1e3
                for r in results
                if r.path == path and r.phase == phase
            ]
        )

    def lat(path: str, phase: str) -> float:
        return med([r.latency_s * 1e3 for r in results if r.path == path and r.phase == phase])

    reading = []
    for phase in ("cold", "warm"):
        g, data, theirs = lat("generate", phase), lat("chat data URIs", phase), lat("vLLM data URIs", phase)
        refs = paired("chat refs", "generate", phase)
        bridged = paired("chat refs+bridge", "generate", phase)
        vs = paired("chat data URIs", "vLLM data URIs", phase)
        reading.append(
            f"{phase}: rendering in the service costs {refs:+.1f} ms per request (paired median; generate "
            f"p50 {g:.1f} ms), bridged {bridged:+.1f} ms; with data URIs this endpoint takes {data:.1f} ms "
            f"at the median against vLLM's server's {theirs:.1f} ms (paired {vs:+.1f} ms)."
        )
    reading += [
        "Where the data-URI path's time goes: `offload ms` is, per inline image and every turn, the "
        "base64 decode, `decode.probe` (the header only), the layout's size check and blake3, then one "
        "`blobs:link` call for the request's images (and, for a new image, its PUT with the store's full "
        "decode); the bytes and headers hashed there are kept, so the generate path decodes each new "
        "image once without a GET. vLLM's server decodes each image once and hashes the pixels. A "
        "client that sends refs (offloading once, as a rollout worker does) pays none of it per turn: "
        "`chat refs`.",
        "What rendering in the service does: read the headers of images it has not described yet (then "
        "kept by digest), apply the chat template and tokenize (once: the endpoint needs no assistant "
        "mask); bridging tokenizes only the new messages.",
    ]
    info = {
        "gpu": gpu,
        "model": model_text(model),
        "engine": engine_text(engine),
        "long": long,
        "throughput": tp,
        "machine": machine_line(),
        "versions": f"vLLM {vllm.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}",
        "date": utc_now(),
        "load_before": load_before,
        "load_after": loadavg(),
        "tokens": " or ".join(map(str, tokens_per_image)),
        "opts": opts,
        "reading": reading,
        "command": f"{env_prefix()}python bench/openai_bench.py " + " ".join(sys.argv[1:]),
    }
    section = markdown(results, agree, info)
    print(section)
    if opts["write"]:
        # a GPU run has its own section: a CPU run never replaces its figures
        write_section(opts["output"], "openai_bench_gpu" if gpu else "openai_bench", section)
        print(f"wrote the openai_bench section of {opts['output']}")
    print(f"done in {time.monotonic() - t_start:.0f}s; load average {loadavg()}")


@app.command()
def main(
    convs: Annotated[int, typer.Option(help="conversations per path")] = 3,
    turns: Annotated[int, typer.Option(help="turns per conversation (2 new images each)")] = 5,
    warm_passes: Annotated[int, typer.Option(help="warm passes over the same conversations")] = 1,
    max_tokens: Annotated[int, typer.Option(help="tokens sampled per request (greedy)")] = 8,
    gap: Annotated[float, typer.Option(help="seconds between blocks (idle workers stop busy-polling)")] = 1.1,
    long_turns: Annotated[
        int, typer.Option(help="also one long conversation per ref path and vLLM (0: none; 20: 40 images)")
    ] = 0,
    rollouts: Annotated[
        int, typer.Option(help="also a throughput run: this many concurrent rollouts per path (0: none)")
    ] = 0,
    rollout_turns: Annotated[int, typer.Option(help="turns per throughput rollout")] = 5,
    rollout_tokens: Annotated[int, typer.Option(help="tokens sampled per throughput turn")] = 32,
    max_model_len: Annotated[
        int, typer.Option(help="vLLM max_model_len on both servers (a 2B model's turn 20: about 33k tokens)")
    ] = 4096,
    output: Annotated[Path, typer.Option(help="results file (its openai_bench section)")] = RESULTS,
    write: Annotated[bool, typer.Option(help="rewrite the section of the results file")] = True,
    cuda_graphs: Annotated[
        bool,
        typer.Option(
            help="GPU: CUDA graphs + torch.compile on both servers (no enforce_eager; the same as "
            "MMSTORE_BENCH_EAGER=0); ignored on CPU, where vLLM runs eager"
        ),
    ] = False,
    keep_tmp: KeepTmpOption = False,
) -> None:
    """Measure the OpenAI endpoint against /v1/generate and vLLM's server; print and record it."""
    if cuda_graphs:  # read by benchlib.engine_settings for both servers' flags
        os.environ["MMSTORE_BENCH_EAGER"] = "0"
    max_images = max(16, 2 * turns, 2 * long_turns, 2 * rollout_turns * bool(rollouts))
    interrupt_on(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)  # unwind through the finally block
    opts = dict(
        convs=convs,
        turns=turns,
        warm_passes=warm_passes,
        max_tokens=max_tokens,
        gap=gap,
        long_turns=long_turns,
        rollouts=rollouts,
        rollout_turns=rollout_turns,
        rollout_tokens=rollout_tokens,
        max_model_len=max_model_len,
        max_images=max_images,
        output=output,
        write=write,
    )
    tmp = Path(tempfile.mkdtemp(prefix="mmstore-openaibench-"))
    stack = Stack(tmp)
    with cleanup(stack, [tmp], keep_tmp, out=None):  # plain print, as the rest of this script
        asyncio.run(bench(opts, stack, tmp))


if __name__ == "__main__":
    app()
