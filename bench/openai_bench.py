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
- ``vLLM data URIs``: vLLM's own server, the same data URIs (``return_token_ids``).

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
    Processes,
    cleanup,
    engine_flags,
    free_port,
    interrupt_on,
    loadavg,
    machine,
    make_app,
    md_table,
    med,
    start_inference,
    start_store,
    tiny_model,
    utc_now,
    wait_ready,
    write_section,
)
from PIL import Image, ImageDraw, ImageFilter

RUN = "bench-openai"
PATHS = ("generate", "chat refs", "chat refs+bridge", "chat data URIs", "vLLM data URIs")
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

    async def turn(self, conv: Conversation, t: int, phase: str, previous: list[int] | None) -> Result:
        o = self.opts
        common = {"max_tokens": o["max_tokens"], "temperature": 0.0}
        render_ms, server = 0.0, {}
        if conv.path == "generate":
            t0 = time.perf_counter()
            rendered = await asyncio.to_thread(self.renderer.render, conv.messages(t, self.ref))
            render_ms = (time.perf_counter() - t0) * 1e3
            body = {
                "prompt_token_ids": rendered.token_ids,
                "descriptors": [d.model_dump(mode="json") for d in rendered.descriptors],
                "sampling": common | {"logprobs": True},
            }
            url = f"{self.urls['inference']}/v1/generate"
        elif conv.path == "vLLM data URIs":
            messages = conv.messages(t, data_uri)
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
            server = {k: v * 1e3 for k, v in out["timings"].items()}
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
    return f"{m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}, Python {m['python']}"


def markdown(results: list[Result], agree: dict, info: dict) -> str:
    o = info["opts"]
    lines = [
        "## OpenAI-compatible endpoint",
        "",
        "Latency per request of `POST /v1/chat/completions` (the service offloads inline images, renders, "
        "then runs the checked generate path) against `POST /v1/generate` with ids the client rendered, "
        "and against vLLM's own OpenAI server given the same images as data URIs; one run of "
        "`bench/openai_bench.py`. Each path has its own images of the same kinds and sizes "
        "(so every path's cold pass is cold); turn k's request carries the whole conversation, 2k images.",
        "",
        f"Machine: {info['machine']}, {info['versions']}. Date: {info['date']}. Load average before/after: "
        f"{info['load_before']} / {info['load_after']} (a shared machine: other engineers' runs compete for "
        "the 2 cores, and both servers' engine workers are pinned to the same core).",
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
        f"- Model: the tiny random-weight Qwen2-VL (`mmstore_trainer.tiny_model`; each image is "
        f"{info['tokens']} tokens), float32, `--enforce-eager`, `gpu_memory_utilization` 0.1, "
        "`VLLM_CPU_KVCACHE_SPACE=1`, max_model_len 4096, `logprobs_mode=processed_logprobs`, seed 0, "
        "`limit_mm_per_prompt` 16 images, on both servers; vLLM's server with `--generation-config vllm`.",
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
    return "\n".join(lines) + "\n"


async def bench(opts: dict, procs: Processes, tmp: Path) -> None:
    from mmstore_client import StoreClient
    from mmstore_client.render import Renderer, image_refs

    t_start = time.monotonic()
    load_before = loadavg()
    model = tiny_model()
    opts["model"] = model.name
    # every MMSTORE_ setting dropped: the servers run with their defaults
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSTORE_")}
    env |= {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    logs = {k: tmp / f"{k}.log" for k in ("store", "inference", "vllm")}
    urls: dict[str, str] = {}
    p_store, urls["store"] = start_store(procs, tmp / "root", logs["store"], env)
    await wait_ready(f"{urls['store']}/healthz", p_store, logs["store"], 30)
    p_inf, urls["inference"] = start_inference(procs, model, urls["store"], logs["inference"], env)
    port = free_port()
    urls["vllm"] = f"http://127.0.0.1:{port}"
    vllm_cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    vllm_cmd += ["--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), *engine_flags()]
    vllm_cmd += [
        "--limit-mm-per-prompt",
        '{"image": 16, "video": 0}',
        "--logprobs-mode",
        "processed_logprobs",
    ]
    vllm_cmd += ["--seed", "0", "--generation-config", "vllm", "--uvicorn-log-level", "warning"]
    p_vllm = procs.start(vllm_cmd, logs["vllm"], env)
    t0 = time.monotonic()
    await asyncio.gather(
        wait_ready(f"{urls['inference']}/readyz", p_inf, logs["inference"], 420),
        wait_ready(f"{urls['vllm']}/health", p_vllm, logs["vllm"], 420),
    )
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
        if path in ("generate", "chat refs", "chat refs+bridge"):  # refs: offloaded by the client first
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
        "base64 decode, `decode.probe` (a full decode for a PNG, see the Layout section), the layout's "
        "size check and blake3, then one `blobs:link` call per image (and, for a new image, its PUT with "
        "the store's full decode). vLLM's server decodes each image once and hashes the pixels. A client "
        "that sends refs (offloading once, as a rollout worker does) pays none of it per turn: `chat refs`.",
        "What rendering in the service does: read the headers of images it has not described yet (then "
        "kept by digest), apply the chat template and tokenize; a render from scratch also builds the "
        "renderer's assistant mask (one template pass per assistant message); bridging tokenizes only "
        "the new messages.",
    ]
    info = {
        "machine": machine_line(),
        "versions": f"vLLM {vllm.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}",
        "date": utc_now(),
        "load_before": load_before,
        "load_after": loadavg(),
        "tokens": " or ".join(map(str, tokens_per_image)),
        "opts": opts,
        "reading": reading,
        "command": f"python bench/openai_bench.py --convs {opts['convs']} --turns {opts['turns']} "
        f"--warm-passes {opts['warm_passes']} --max-tokens {opts['max_tokens']} --gap {opts['gap']:g}",
    }
    section = markdown(results, agree, info)
    print(section)
    if opts["write"]:
        write_section(opts["output"], "openai_bench", section)
        print(f"wrote the openai_bench section of {opts['output']}")
    print(f"done in {time.monotonic() - t_start:.0f}s; load average {loadavg()}")


@app.command()
def main(
    convs: Annotated[int, typer.Option(help="conversations per path")] = 3,
    turns: Annotated[int, typer.Option(help="turns per conversation (2 new images each)")] = 5,
    warm_passes: Annotated[int, typer.Option(help="warm passes over the same conversations")] = 1,
    max_tokens: Annotated[int, typer.Option(help="tokens sampled per request (greedy)")] = 8,
    gap: Annotated[float, typer.Option(help="seconds between blocks (idle workers stop busy-polling)")] = 1.1,
    output: Annotated[Path, typer.Option(help="results file (its openai_bench section)")] = RESULTS,
    write: Annotated[bool, typer.Option(help="rewrite the section of the results file")] = True,
    keep_tmp: KeepTmpOption = False,
) -> None:
    """Measure the OpenAI endpoint against /v1/generate and vLLM's server; print and record it."""
    if 2 * turns > 16:
        raise typer.BadParameter(f"turn {turns} would carry {2 * turns} images, over the limit of 16")
    interrupt_on(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)  # unwind through the finally block
    opts = dict(
        convs=convs,
        turns=turns,
        warm_passes=warm_passes,
        max_tokens=max_tokens,
        gap=gap,
        output=output,
        write=write,
    )
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="mmstore-openaibench-"))
    with cleanup(procs, [tmp], keep_tmp, out=None):  # plain print, as the rest of this script
        asyncio.run(bench(opts, procs, tmp))


if __name__ == "__main__":
    app()
