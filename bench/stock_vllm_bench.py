"""Stock vLLM + the mmstore plugin (refs) against the same server with data URIs and against
``mmstore-inference``, side by side in one run.

Run: ``.venv/bin/python bench/stock_vllm_bench.py`` (several minutes on 2 cores).
Starts a real ``mmstore serve``, stock vLLM's OpenAI server with ``--enable-scale-out`` and
``VLLM_MEDIA_CONNECTOR=mmstore`` (``python -m vllm.entrypoints.openai.api_server``), and
``mmstore-inference serve``, on the tiny checkpoint with the same engine arguments, and sends each
path the same kind of multi-turn conversations (turn k carries 2k images: per turn a 1280x720
screenshot PNG and a 640x480 JPEG; fixed assistant replies; greedy; a few tokens):

- ``(a) vLLM+plugin refs``: ``POST /inference/v1/generate``, the renderer's ids with each image run
  collapsed to one pad, ``content_parts`` with ``mmstore://`` refs (images offloaded once);
- ``(b) vLLM data URIs``: the same server and ids, ``content_parts`` with base64 data URIs;
- ``(c) mmstore-inference``: ``POST /v1/generate`` with the renderer's ids and descriptors.

Cold: images new to the servers; warm: the same conversations again. Per request: latency, bytes
on the wire (request body), and the server's CPU time (user+system of every process of its
session: API server and engine core) divided by the images the request carried. Each answer's
prompt ids are compared with the client-side renderer's. Prints the tables and rewrites the
``stock_vllm_bench`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
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
    cleanup,
    interrupt_on,
    loadavg,
    make_app,
    md_table,
    med,
    tiny_model,
    utc_now,
    write_section,
)
from mmstore_rollout.stack import Stack, inference_service, store_service, vllm_service, wait_ready
from openai_bench import Conversation, data_uri, machine_line, photo_jpeg, screenshot_png

RUN = "bench-stock-vllm"
PATHS = ("(a) vLLM+plugin refs", "(b) vLLM data URIs", "(c) mmstore-inference")
app = make_app(__doc__)
CLK = os.sysconf("SC_CLK_TCK")


def session_cpu_s(sid: int) -> float:
    """User+system CPU seconds of every live process in session ``sid`` (a server and its children)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of stat (session), 4th after the name
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK


@dataclass
class Result:
    path: str
    phase: str
    conv: int
    turn: int
    images: int
    latency_s: float
    wire_bytes: int
    cpu_s: float
    exact: bool


class Runner:
    def __init__(self, http, urls, pids, renderer) -> None:
        self.http, self.urls, self.pids, self.renderer = http, urls, pids, renderer

    @staticmethod
    def ref(data: bytes) -> str:
        from mmstore_client.digest import compute_digest, make_ref

        return make_ref(compute_digest(data))

    async def turn(self, conv: Conversation, t: int, phase: str, max_tokens: int) -> Result:
        from mmstore_client import decode
        from mmstore_client.digest import compute_digest
        from mmstore_client.placeholders import collapse

        images = [b for turn in conv.images[: t + 1] for b in turn]
        headers = {compute_digest(b): decode.probe(b) for b in images}  # the bytes are at hand
        rendered = await asyncio.to_thread(self.renderer.render, conv.messages(t, self.ref), headers)
        if conv.path.startswith("(c)"):
            url, server = f"{self.urls['inference']}/v1/generate", "inference"
            body = {
                "prompt_token_ids": rendered.token_ids,
                "descriptors": [d.model_dump(mode="json") for d in rendered.descriptors],
                "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "logprobs": True},
            }
        else:
            url, server = f"{self.urls['vllm']}/inference/v1/generate", "vllm"
            to_url = self.ref if conv.path.startswith("(a)") else data_uri
            body = {
                "token_ids": collapse(rendered.token_ids, rendered.image_spans),
                "content_parts": [{"type": "image_url", "url": to_url(b)} for b in images],
                "sampling_params": {"max_tokens": max_tokens, "temperature": 0.0, "logprobs": 0},
                "return_token_ids": True,
            }
        payload = json.dumps(body).encode()
        cpu0 = session_cpu_s(self.pids[server])
        t0 = time.perf_counter()
        r = await self.http.post(url, content=payload, headers={"content-type": "application/json"})
        latency = time.perf_counter() - t0
        cpu = session_cpu_s(self.pids[server]) - cpu0
        r.raise_for_status()
        exact = r.json()["prompt_token_ids"] == rendered.token_ids
        return Result(conv.path, phase, conv.index, t + 1, len(images), latency, len(payload), cpu, exact)

    async def conversation(self, conv: Conversation, phase: str, max_tokens: int) -> list[Result]:
        return [await self.turn(conv, t, phase, max_tokens) for t in range(len(conv.images))]


def markdown(results: list[Result], info: dict) -> str:
    turns = max(r.turn for r in results)

    def pick(path, phase, turn=None):
        return [
            r for r in results if r.path == path and r.phase == phase and (turn is None or r.turn == turn)
        ]

    rows = []
    for phase in ("cold", "warm"):
        for path in PATHS:
            rs = pick(path, phase)
            last = pick(path, phase, turns)
            per_rollout = sum(r.wire_bytes for r in rs) / max(1, len({r.conv for r in rs}))
            rows.append(
                [
                    phase,
                    path,
                    f"{med([r.latency_s * 1e3 for r in rs]):.1f}",
                    f"{med([r.latency_s * 1e3 for r in last]):.1f}",
                    f"{per_rollout / 1e6:.3f}",
                    f"{sum(r.cpu_s for r in rs) / max(1, sum(r.images for r in rs)) * 1e3:.2f}",
                    f"{sum(r.exact for r in rs)}/{len(rs)}",
                ]
            )
    cols = [
        "phase",
        "path",
        "p50 ms (all turns)",
        f"p50 ms turn {turns}",
        "MB on the wire / rollout",
        "server CPU ms / image",
        "prompt = renderer",
    ]
    per_turn = []
    for t in range(1, turns + 1):
        per_turn.append(
            [str(t), str(2 * t)]
            + [f"{med([r.latency_s * 1e3 for r in pick(p, 'warm', t)]):.1f}" for p in PATHS]
        )

    def warm_last(path):
        return med([r.latency_s for r in pick(path, "warm", turns)])

    a, b, c = (warm_last(p) for p in PATHS)
    lines = [
        "## Stock vLLM with the mmstore plugin: refs against data URIs against mmstore-inference",
        "",
        f"Measured {info['date']} on {info['machine']}; load average {info['load_before']} before, "
        f"{info['load_after']} after. The machine is shared with other sessions' work: noisy.",
        f"`{info['command']}`; {info['versions']}.",
        "",
        *md_table(cols, rows, left={"phase", "path"}),
        "",
        "Warm latency per turn (p50 ms):",
        "",
        *md_table(["turn", "images", *PATHS], per_turn, left=set()),
        "",
        f"Targets at turn {turns} warm: (a) is {b / a:.2f}x faster than (b) (target at least 1.5x); "
        f"(a) is {(a / c - 1) * 100:+.1f}% against (c) (target within 10%). Each turn's figure is the "
        f"median of {info['convs']} conversations: single requests on a shared machine. Over all warm "
        f"turns the p50s are (a) {med([r.latency_s * 1e3 for r in pick(PATHS[0], 'warm')]):.1f} ms and "
        f"(c) {med([r.latency_s * 1e3 for r in pick(PATHS[2], 'warm')]):.1f} ms.",
    ]
    return "\n".join(lines) + "\n"


async def bench(opts: dict, stack: Stack, tmp: Path) -> None:
    import torch
    import transformers
    import vllm
    from mmstore_client import StoreClient
    from mmstore_client.render import Renderer

    load_before = loadavg()
    model = tiny_model()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSTORE_")}
    env |= {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    engine = bench_engine()
    store_server = stack.start(store_service(tmp, root=tmp / "root", env=env))
    wait_ready([store_server], 30)
    inference = stack.start(inference_service(model, store_server.url, tmp, engine=engine, env=env))
    args = ["--seed", "0", "--uvicorn-log-level", "warning"]
    images = 2 * opts["turns"]
    plugin = vllm_service(
        model, tmp, engine=engine, store_url=store_server.url, max_images=images, args=args, env=env
    )
    stack.start(plugin)
    wait_ready([inference, plugin], 600)
    print(f"servers ready (logs in {tmp})", flush=True)
    urls = {"store": store_server.url, "inference": inference.url, "vllm": plugin.url}
    pids = {"vllm": plugin.proc.pid, "inference": inference.proc.pid}  # each leads its own session

    store = StoreClient(urls["store"])
    renderer = Renderer.from_pretrained(model)
    convs: dict[str, list[Conversation]] = {}
    warmups: dict[str, Conversation] = {}
    for k, path in enumerate(PATHS):
        seed = 1000 * (k + 1)
        make = lambda s: [[screenshot_png(s + t), photo_jpeg(s + t)] for t in range(opts["turns"])]  # noqa: E731
        convs[path] = [Conversation(path, c, make(seed + 10 * c)) for c in range(opts["convs"])]
        warmups[path] = Conversation(path, -1, make(seed + 900)[:1])
        for conv in [*convs[path], warmups[path]]:  # every path's images: the client renders with refs
            for turn in conv.images:
                for data in turn:
                    store.put(data, RUN)

    results: list[Result] = []
    async with httpx.AsyncClient(timeout=600) as http:
        runner = Runner(http, urls, pids, renderer)
        for path in PATHS:
            await runner.conversation(warmups[path], "warmup", opts["max_tokens"])
        block = 0
        for phase in ("cold", "warm"):
            for c in range(opts["convs"]):
                order = PATHS[block % len(PATHS) :] + PATHS[: block % len(PATHS)]
                block += 1
                for path in order:
                    await asyncio.sleep(opts["gap"])
                    results += await runner.conversation(convs[path][c], phase, opts["max_tokens"])
            print(f"{phase} pass done", flush=True)
    store.close()
    info = {
        "date": utc_now(),
        "convs": opts["convs"],
        "machine": machine_line(),
        "load_before": load_before,
        "load_after": loadavg(),
        "versions": f"vLLM {vllm.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}",
        "command": f"python bench/stock_vllm_bench.py --convs {opts['convs']} --turns {opts['turns']} "
        f"--max-tokens {opts['max_tokens']}",
    }
    section = markdown(results, info)
    print(section)
    if opts["write"]:
        write_section(opts["output"], "stock_vllm_bench", section)
        print(f"wrote the stock_vllm_bench section of {opts['output']}")


@app.command()
def main(
    convs: Annotated[int, typer.Option(help="conversations per path")] = 2,
    turns: Annotated[int, typer.Option(help="turns per conversation (2 new images each)")] = 5,
    max_tokens: Annotated[int, typer.Option(help="tokens sampled per request (greedy)")] = 4,
    gap: Annotated[float, typer.Option(help="seconds between blocks (idle workers stop busy-polling)")] = 1.1,
    output: Annotated[Path, typer.Option(help="results file (its stock_vllm_bench section)")] = RESULTS,
    write: Annotated[bool, typer.Option(help="rewrite the section of the results file")] = True,
    keep_tmp: KeepTmpOption = False,
) -> None:
    """Measure stock vLLM + plugin (refs, data URIs) against mmstore-inference; print and record it."""
    interrupt_on(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    opts = dict(convs=convs, turns=turns, max_tokens=max_tokens, gap=gap, output=output, write=write)
    tmp = Path(tempfile.mkdtemp(prefix="mmstore-stockbench-"))
    stack = Stack(tmp)
    with cleanup(stack, [tmp], keep_tmp, out=None):
        asyncio.run(bench(opts, stack, tmp))


if __name__ == "__main__":
    app()
