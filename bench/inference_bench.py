"""The inference service with refs vs vLLM given the decoded images in-process, side by side.

Run: ``.venv/bin/python bench/inference_bench.py`` (or ``make bench``). Starts a real
``mmstore serve`` and a real ``mmstore-inference serve`` (vLLM CPU, the tiny random-weight
Qwen2-VL) as subprocesses on free loopback ports, and in this process a vLLM ``AsyncLLM`` with
the same engine arguments (the floor). Both are fed the same 5-turn, 2-images-per-turn
conversations, greedy, a few tokens per request; each turn's request carries the whole
conversation so far (turn k carries 2k images).

(a) service: ``AsyncInferenceClient.generate`` with the rendered token ids and the descriptors
    (refs): HTTP + JSON, validation, fetch by digest from the store, blake3 verify, decode,
    vLLM's renderer, the placeholder check, then vLLM.
(b) floor: ``AsyncLLM.generate`` with a ``TokensPrompt`` of one pad per image, the images
    already decoded (``multi_modal_data``), the digests as ``multi_modal_uuids``, the same
    ``SamplingParams`` the service builds.

Cold: new images never seen by either engine (service byte/decoded caches, vLLM's processor,
encoder and prefix caches all empty for them). Warm: the same conversations again. The paths
alternate in blocks of one conversation, with a pause between blocks so the idle engine's worker
has stopped busy-polling (vLLM's shm queue spins for 1 s after its last read). Prints the
tables and rewrites the ``## Inference`` section of ``bench/RESULTS.md`` (between the
``inference_bench`` markers only).
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from benchlib import (
    RESULTS,
    KeepTmpOption,
    OutputOption,
    WriteOption,
    add_to_path,
    bench_engine,
    bench_model,
    cleanup,
    console,
    engine_text,
    env_prefix,
    interrupt_on,
    loadavg,
    machine,
    make_app,
    md_table,
    med,
    model_text,
    open_env,
    rich_table,
    write_section,
)
from mmstore_inference.settings import InferenceSettings
from mmstore_rollout.stack import Stack, inference_service, on_gpu, store_service, wait_ready
from rich.table import Table

add_to_path("clients")  # mmstore_client, if the venv lacks it

RUN = "bench-inference"
WARM_TARGET = 0.05  # warm overhead <= 5% of (b)'s latency
COLD_TARGET_MS = 2.0  # cold overhead <= 2 ms per image plus transfer
MAX_IMAGES = InferenceSettings.model_fields["max_images_per_prompt"].default  # both paths' limit

app = make_app(__doc__)


# --------------------------------------------------------------------------- workload


@dataclass
class Turn:
    conv: str
    turn: int  # 1-based
    ids: list[int]  # rendered, placeholder runs expanded
    compact: list[int]  # one pad per image (what (b) gets)
    descriptors: list[Any]
    digests: list[str]
    new: int  # images first seen in this request


@dataclass
class Sample:
    phase: str  # "cold" / "warm"
    t: Turn
    a_s: float  # client-measured latency of the service
    b_s: float  # latency of the in-process engine
    timings: dict[str, float]  # the service's own
    a_tokens: list[int]
    b_tokens: list[int]
    a_cached: int
    b_cached: int
    prompt_ok: bool  # the service's and the engine's prompts equal the rendered ids

    @property
    def images(self) -> int:
        return len(self.t.digests)

    @property
    def overhead_s(self) -> float:
        return self.a_s - self.b_s


def build_images(n_convs: int, turns: int, seed: int) -> list[list[list[bytes]]]:
    """Per conversation, per turn: a 1280x720 screenshot PNG and a 640x480 photo JPEG."""
    from layout_bench import photo_jpeg, screenshot_png

    return [
        [
            [screenshot_png(1280, 720, seed + 100 * c + t), photo_jpeg(640, 480, seed + 100 * c + t)]
            for t in range(turns)
        ]
        for c in range(n_convs)
    ]


def render_conversations(renderer, store, images: list[list[list[bytes]]], tag: str) -> list[list[Turn]]:
    from mmstore_client.digest import make_ref
    from mmstore_client.placeholders import check_runs, collapse
    from mmstore_client.render import image_refs

    convs = []
    for c, conv_images in enumerate(images):
        messages: list[dict] = []
        seen: set[str] = set()
        turns = []
        for t, imgs in enumerate(conv_images, 1):
            refs = [make_ref(store.put(data, RUN).digest) for data in imgs]
            messages.append(
                {
                    "role": "user",
                    "content": [
                        *({"type": "image_url", "image_url": {"url": r}} for r in refs),
                        {"type": "text", "text": f"Step {t}: what changed on the screen, and what next?"},
                    ],
                }
            )
            rendered = renderer.render(messages, store.image_headers(image_refs(messages)))
            digests = [d.digest for d in rendered.descriptors]
            runs = check_runs(rendered.token_ids, rendered.descriptors, renderer.image_token_id)
            new = len(set(digests) - seen)
            seen |= set(digests)
            turns.append(
                Turn(
                    f"{tag}{c}",
                    t,
                    rendered.token_ids,
                    collapse(rendered.token_ids, runs),
                    rendered.descriptors,
                    digests,
                    new,
                )
            )
            messages.append({"role": "assistant", "content": f"Clicked item {t}; the list updated."})
        convs.append(turns)
    return convs


# --------------------------------------------------------------------------- the two paths


@dataclass
class Paths:
    llm: Any  # vLLM's AsyncLLM, built from the service's engine arguments
    client: Any  # AsyncInferenceClient
    params: Any
    max_tokens: int
    decoded: dict[str, Any] = field(default_factory=dict)  # digest -> RGB image, for (b)

    async def service(self, t: Turn) -> tuple[float, Any]:
        from mmstore_client.inference import GenerateRequest, SamplingOptions

        req = GenerateRequest(
            prompt_token_ids=t.ids,
            descriptors=t.descriptors,
            sampling=SamplingOptions(max_tokens=self.max_tokens, temperature=0.0),
        )
        t0 = time.perf_counter()
        resp = await self.client.generate(req)
        return time.perf_counter() - t0, resp

    async def direct(self, t: Turn) -> tuple[float, Any]:
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=t.compact)
        if t.digests:
            prompt["multi_modal_data"] = {"image": [self.decoded[d] for d in t.digests]}
            prompt["multi_modal_uuids"] = {"image": list(t.digests)}
        t0 = time.perf_counter()
        final = None
        async for out in self.llm.generate(prompt, self.params, uuid.uuid4().hex):
            final = out
        return time.perf_counter() - t0, final


async def run_block(paths: Paths, phase: str, conv: list[Turn], b_first: bool, gap: float) -> list[Sample]:
    """One conversation on one path, pause, the same conversation on the other path."""
    a_res: list[tuple[float, Any]] = []
    b_res: list[tuple[float, Any]] = []
    order = ("b", "a") if b_first else ("a", "b")
    for k, which in enumerate(order):
        if k:
            await asyncio.sleep(gap)  # let the other engine's worker leave its busy-poll
        for t in conv:
            if which == "a":
                a_res.append(await paths.service(t))
            else:
                b_res.append(await paths.direct(t))
    out = []
    for t, (a_s, a), (b_s, b) in zip(conv, a_res, b_res, strict=True):
        out.append(
            Sample(
                phase=phase,
                t=t,
                a_s=a_s,
                b_s=b_s,
                timings=a.timings.model_dump(),
                a_tokens=list(a.samples[0].token_ids),
                b_tokens=list(b.outputs[0].token_ids),
                a_cached=a.usage.cached_prompt_tokens or 0,
                b_cached=b.num_cached_tokens or 0,
                prompt_ok=list(a.prompt_token_ids) == t.ids and list(b.prompt_token_ids) == t.ids,
            )
        )
    return out


# --------------------------------------------------------------------------- cost model


async def per_image_costs(store_url: str, kinds: dict[str, list[bytes]], reps: int = 5) -> dict[str, dict]:
    """Per kind of image, medians per image (ms) of what a cold image costs the service outside
    vLLM, measured here with the service's own functions: GET from the store, blake3 verify,
    ``decode.decode_rgb`` (and, inside it, ``decode.probe``); and the read of the pixels the store
    kept instead, as the service reads them (``AsyncStoreClient.pixels`` over
    :class:`~mmstore_client.transport.AiohttpTransport`; NaN where the store keeps none, as for JPEGs)."""
    from mmstore_client import AsyncStoreClient, decode
    from mmstore_client.digest import compute_digest
    from mmstore_client.transport import AiohttpTransport

    async def pixel_reads(digest: str) -> list[float]:
        times = []
        async with AsyncStoreClient(store_url, transport=AiohttpTransport()) as client:
            for _ in range(reps):
                t0 = time.perf_counter()
                kept = await client.pixels(digest)
                times.append((time.perf_counter() - t0) * 1e3 if kept is not None else math.nan)
        return times

    out = {}
    with httpx.Client(base_url=store_url, timeout=30) as c:
        for kind, blobs in kinds.items():
            cols: dict[str, list[float]] = {"get_ms": [], "verify_ms": [], "decode_ms": [], "probe_ms": []}
            pixels_ms = []
            for data in blobs:
                digest = compute_digest(data)
                per: dict[str, list[float]] = {k: [] for k in cols}
                for _ in range(reps):
                    t0 = time.perf_counter()
                    body = c.get(f"/v1/blobs/{digest}").content
                    t1 = time.perf_counter()
                    compute_digest(body)
                    t2 = time.perf_counter()
                    decode.decode_rgb(body)
                    t3 = time.perf_counter()
                    decode.probe(body)
                    t4 = time.perf_counter()
                    for k, v in zip(cols, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                        per[k].append(v * 1e3)
                for k in cols:
                    cols[k].append(statistics.median(per[k]))
                pixels_ms.append(statistics.median(await pixel_reads(digest)))
            out[kind] = {k: statistics.median(v) for k, v in cols.items()}
            out[kind]["pixels_ms"] = statistics.median(pixels_ms)
            out[kind]["kB"] = sum(map(len, blobs)) / len(blobs) / 1e3
    return out


def service_counters(url: str) -> dict[str, float]:
    """The inference service's counters (the names rollout reads)."""
    from mmstore_rollout.service_metrics import INFERENCE_COUNTERS, read_counters

    return read_counters(httpx.get(f"{url}/metrics", timeout=10).text, INFERENCE_COUNTERS)


def costs_text(costs: dict[str, dict]) -> str:
    return "; ".join(
        f"{kind} ({c['kB']:,.0f} kB): GET {c['get_ms']:.2f} ms, verify {c['verify_ms']:.2f} ms, "
        f"decode_rgb {c['decode_ms']:.2f} ms (of which its probe {c['probe_ms']:.2f} ms)"
        + ("" if math.isnan(c["pixels_ms"]) else f", or the store's pixels {c['pixels_ms']:.2f} ms")
        for kind, c in costs.items()
    )


# --------------------------------------------------------------------------- stats and report


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return min(xs), max(xs)
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


@dataclass
class Summary:
    phase: str
    requests: int
    images: float  # mean images per request
    new: float  # mean new images per request
    a_ms: float
    b_ms: float
    d_ms: float  # median of the paired differences
    d_q1: float
    d_q3: float
    d_mean: float
    pct: float  # median overhead / median (b)
    pct_sum: float  # sum of overheads / sum of (b)
    per_image_ms: float  # median over requests of overhead / images
    per_new_ms: float  # median over requests of overhead / new images (cold)
    fetch_ms: float
    process_ms: float
    generate_ms: float
    total_ms: float
    http_ms: float  # (a) client latency - the service's total_s
    same_tokens: int
    prompts_ok: int
    a_cached: float
    b_cached: float
    target: str = ""


def summarize(phase: str, samples: list[Sample], transfer_ms: float) -> Summary:
    s = [x for x in samples if x.phase == phase]
    d = [x.overhead_s * 1e3 for x in s]
    q1, q3 = quartiles(d)
    b = [x.b_s * 1e3 for x in s]
    summary = Summary(
        phase=phase,
        requests=len(s),
        images=statistics.mean(x.images for x in s),
        new=statistics.mean(x.t.new for x in s) if phase == "cold" else 0.0,  # warm: all seen before
        a_ms=med([x.a_s * 1e3 for x in s]),
        b_ms=med(b),
        d_ms=med(d),
        d_q1=q1,
        d_q3=q3,
        d_mean=statistics.mean(d),
        pct=med(d) / med(b),
        pct_sum=sum(d) / sum(b),
        per_image_ms=med([x.overhead_s * 1e3 / x.images for x in s]),
        per_new_ms=(
            med([x.overhead_s * 1e3 / x.t.new for x in s if x.t.new]) if phase == "cold" else float("nan")
        ),
        fetch_ms=med([x.timings["fetch_s"] * 1e3 for x in s]),
        process_ms=med([x.timings["process_s"] * 1e3 for x in s]),
        generate_ms=med([x.timings["generate_s"] * 1e3 for x in s]),
        total_ms=med([x.timings["total_s"] * 1e3 for x in s]),
        http_ms=med([(x.a_s - x.timings["total_s"]) * 1e3 for x in s]),
        same_tokens=sum(x.a_tokens == x.b_tokens for x in s),
        prompts_ok=sum(x.prompt_ok for x in s),
        a_cached=statistics.mean(x.a_cached for x in s),
        b_cached=statistics.mean(x.b_cached for x in s),
    )
    if phase == "warm":
        met = summary.pct <= WARM_TARGET
        summary.target = ("met" if met else "not met") + f" (<= {WARM_TARGET:.0%} of (b))"
    else:
        met = summary.per_new_ms <= COLD_TARGET_MS + transfer_ms
        summary.target = (
            "met" if met else "not met"
        ) + f" (<= {COLD_TARGET_MS:g} ms + {transfer_ms:.2f} ms transfer per new image)"
    return summary


def by_turn(samples: list[Sample], phase: str) -> list[tuple[int, int, float, float, float, float, float]]:
    rows = []
    for turn in sorted({x.t.turn for x in samples}):
        s = [x for x in samples if x.phase == phase and x.t.turn == turn]
        if not s:
            continue
        rows.append(
            (
                turn,
                s[0].images,
                med([x.a_s * 1e3 for x in s]),
                med([x.b_s * 1e3 for x in s]),
                med([x.overhead_s * 1e3 for x in s]),
                med([x.timings["fetch_s"] * 1e3 for x in s]),
                med([x.timings["process_s"] * 1e3 for x in s]),
            )
        )
    return rows


SUMMARY_COLS = [
    "pass",
    "requests",
    "images/req",
    "new/req",
    "(a) service p50 ms",
    "(b) vLLM direct p50 ms",
    "overhead/req p50 ms",
    "IQR ms",
    "overhead % of (b)",
    "per image ms",
    "per new image ms",
    "target",
]
BREAKDOWN_COLS = [
    "pass",
    "fetch ms",
    "process ms",
    "generate ms",
    "service total ms",
    "HTTP+JSON ms",
    "same tokens",
    "prompts exact",
    "cached tok (a)",
    "cached tok (b)",
]
TURN_COLS = ["pass", "turn", "images", "(a) ms", "(b) ms", "overhead ms", "fetch ms", "process ms"]
LEFT = ("pass", "target")  # the other columns are numbers


def summary_cells(s: Summary) -> list[str]:
    return [
        s.phase,
        str(s.requests),
        f"{s.images:.1f}",
        f"{s.new:.1f}",
        f"{s.a_ms:.1f}",
        f"{s.b_ms:.1f}",
        f"{s.d_ms:+.1f}",
        f"{s.d_q1:+.1f} .. {s.d_q3:+.1f}",
        f"{s.pct:+.1%} (sum {s.pct_sum:+.1%})",
        f"{s.per_image_ms:+.2f}",
        f"{s.per_new_ms:+.2f}" if s.new else "",
        s.target,
    ]


def breakdown_cells(s: Summary) -> list[str]:
    return [
        s.phase,
        f"{s.fetch_ms:.2f}",
        f"{s.process_ms:.2f}",
        f"{s.generate_ms:.2f}",
        f"{s.total_ms:.2f}",
        f"{s.http_ms:.2f}",
        f"{s.same_tokens}/{s.requests}",
        f"{s.prompts_ok}/{s.requests}",
        f"{s.a_cached:.0f}",
        f"{s.b_cached:.0f}",
    ]


def turn_cells(phase: str, r: tuple) -> list[str]:
    turn, images, a, b, d, f, p = r
    return [phase, str(turn), str(images), f"{a:.1f}", f"{b:.1f}", f"{d:+.1f}", f"{f:.2f}", f"{p:.2f}"]


def console_tables(summaries: list[Summary], turns: dict[str, list]) -> list[Table]:
    out = []
    for title, cols, rows in (
        (
            "(a) service with refs vs (b) vLLM with decoded images, per request",
            SUMMARY_COLS,
            [summary_cells(s) for s in summaries],
        ),
        (
            "the service's own timings (medians) and agreement",
            BREAKDOWN_COLS,
            [breakdown_cells(s) for s in summaries],
        ),
        ("by turn (medians)", TURN_COLS, [turn_cells(p, r) for p, rs in turns.items() for r in rs]),
    ):
        out.append(rich_table(title, cols, rows, LEFT))
    return out


def markdown(summaries: list[Summary], turns: dict[str, list], costs: dict, info: dict, st: dict) -> str:
    cold = next(s for s in summaries if s.phase == "cold")
    warm = next(s for s in summaries if s.phase == "warm")
    decode_sum = sum(c["decode_ms"] for c in costs.values())
    get_sum = sum(c["get_ms"] for c in costs.values())
    gpu = info["gpu"]
    es = st["engine_settings"]  # both paths' InferenceSettings
    lines = [
        "## Inference on a GPU" if gpu else "## Inference",
        "",
        "The same multi-turn conversations through (a) `mmstore-inference` with refs and (b) vLLM "
        "given the decoded images directly in-process (the floor), side by side in one run of "
        "`bench/inference_bench.py` (`make bench`). Targets (issue): warm overhead <= 5% of (b)'s "
        "latency; cold <= 2 ms per image plus transfer. Overhead = (a) - (b) per request, paired "
        "(same request on both paths).",
        "",
        f"Machine: {'GPU ' + gpu + ', ' if gpu else ''}{info['nproc']} CPUs ({info['cpu']}), "
        f"{info['memory']} RAM, Linux {info['kernel']}, "
        f"Python {info['python']}, {st['versions']}. Date: {info['date']}. Load average "
        f"before/after: {st['load_before']} / {st['load_after']}"
        + (
            "."
            if gpu
            else " (shared machine: other engineers' test runs compete for the 2 cores, and on 2 "
            "cores the store, both API processes and the client share the core that vLLM's worker "
            "is not pinned to)."
        ),
        "",
        *md_table(SUMMARY_COLS, [summary_cells(s) for s in summaries], LEFT),
        "",
        "The service's own `timings` (medians over the requests) and agreement between the paths:",
        "",
        *md_table(BREAKDOWN_COLS, [breakdown_cells(s) for s in summaries], LEFT),
        "",
        "By turn (turn k carries 2k images; medians):",
        "",
        *md_table(TURN_COLS, [turn_cells(p, r) for p, rs in turns.items() for r in rs], LEFT),
        "",
        "What a cold image costs outside vLLM, measured in the bench process on the same images with "
        "the service's functions (median per image; GET over loopback is the transfer): "
        f"{costs_text(costs)}. Fetched as bytes and decoded, the two new images of a cold request "
        f"would cost about {decode_sum:.1f} ms of decoding (in parallel threads) plus {get_sum:.1f} ms "
        f"of GETs; the median fetch_s in the service was {cold.fetch_ms:.1f} ms. In the cold pass the "
        f"service took {st['cold_path']['store_pixels']:.0f} new images as the pixels the store kept "
        f"from verifying their upload and decoded {st['cold_path']['decodes']:.0f} itself (the JPEGs, "
        "whose pixels the store does not keep).",
        "",
        "Reading the numbers:",
        "",
        f"- Warm: the overhead is {warm.d_ms:+.1f} ms per request (median of the paired differences, "
        f"IQR {warm.d_q1:+.1f} .. {warm.d_q3:+.1f} ms) on a (b) latency of {warm.b_ms:.1f} ms, whose "
        f"5% is {warm.b_ms * WARM_TARGET:.1f} ms. The "
        "service's fetch step is cache hits (microseconds); what remains is HTTP + JSON + pydantic "
        "validation of ids and descriptors on both ends (the HTTP+JSON column: client latency minus "
        "the service's own total) plus the service's checks. "
        + ("" if gpu else "The tiny model makes (b) very short: ")
        + f"the same absolute overhead would be within 5% of any (b) above {warm.d_ms / WARM_TARGET:.0f} ms.",
        f"- Cold: {cold.per_new_ms:+.2f} ms per new image (all of the request's overhead charged to "
        f"its {cold.new:.0f} new images), {cold.per_image_ms:+.2f} ms per image in the request; the "
        f"target allows {COLD_TARGET_MS:g} ms + the measured GET per image. The service's fetch_s "
        "holds the new images' reads (the PNG's pixels from the store, the JPEG's bytes, verified) "
        "and the JPEG's decode: pure overhead here, because (b) was handed decoded images."
        + (
            " A PNG's decode_rgb includes a second full decode inside `decode.probe` (see the Layout "
            "section)."
            if any(c["probe_ms"] > 0.2 * c["decode_ms"] for c in costs.values())
            else ""
        ),
        (
            "- Noise: the IQR column shows the spread of the paired differences."
            if gpu
            else "- Noise: single requests vary by several ms on this shared 2-core machine; the IQR "
            "column shows the spread of the paired differences. Differences under ~2 ms per request "
            "are within noise."
        ),
        "",
        "Settings:",
        "",
        f"- Model: {st['model']} (each image {st['tokens']}), {st['engine']}, "
        f"max_model_len {es.max_model_len}, prefix caching on, `logprobs_mode={es.logprobs_mode}`, "
        f"`limit_mm_per_prompt={{'image': {es.max_images_per_prompt}, 'video': 0}}`, seed {es.seed}; (b) "
        "runs on the `AsyncEngineArgs` the service builds (`mmstore_inference.engine.engine_args` of the "
        "same settings).",
        f"- Workload: {st['convs']} conversations per image set x {st['turns']} turns, 2 new images per "
        "turn (a 1280x720 screenshot PNG and a 640x480 photo JPEG, the generators of "
        "`bench/layout_bench.py`), fixed user and assistant texts, each turn's request carrying the "
        f"whole conversation so far; greedy, max_tokens {st['max_tokens']}, logprobs on, image "
        "markup tokens banned by logit_bias (the service's defaults; (b)'s `SamplingParams` are built by "
        "the service's `Engine.sampling_params`).",
        f"- Cold: {st['cold_sets']} image set(s), never seen by either engine; one warm-up "
        "conversation with its own images runs first on each path (vLLM's first multimodal request "
        f"is slow). Warm: {st['warm_passes']} more pass(es) over the same conversations. Blocks of "
        f"one conversation alternate between the paths (order flipped every block) with a "
        f"{st['gap']:g} s pause between blocks, since an idle vLLM worker busy-polls for 1 s after "
        + ("its last request." if gpu else "its last request and both workers are pinned to the same core."),
        "- (a) is timed in the client around `AsyncInferenceClient.generate` over `AiohttpTransport` "
        "(body encoding, HTTP on loopback, response parsing included); (b) around `AsyncLLM.generate` "
        "in this process.",
        f"- Command: `{st['command']}`",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


async def bench(opts: dict, stack: Stack, tmp: Path) -> None:
    from mmstore_client import StoreClient, decode
    from mmstore_client.digest import compute_digest
    from mmstore_client.inference import AsyncInferenceClient, SamplingOptions
    from mmstore_client.layouts import Layout
    from mmstore_client.placeholders import image_markup_ids
    from mmstore_client.render import Renderer
    from mmstore_client.transport import AiohttpTransport
    from mmstore_inference.engine import Engine, engine_args

    t_start = time.monotonic()
    load_before = loadavg()
    model = bench_model()
    gpu = on_gpu()
    # one set of engine settings for both paths: the service gets them as flags, (b) as the
    # InferenceSettings the service parses them into (both read the same MMSTORE_INFERENCE_* rest)
    engine = bench_engine(opts["max_model_len"], cuda_graphs=opts["cuda_graphs"])
    settings = InferenceSettings(model=model, **engine.settings())

    # ---- store, then the service (on CPU its engine loads while ours does)
    env = open_env()
    store = stack.start(store_service(tmp, root=tmp / "root", env=env))
    wait_ready([store], 30)
    inference = stack.start(inference_service(model, store.url, tmp, engine=engine, env=env))
    console.print(
        f"store on :{store.port}, inference on :{inference.port} (log {inference.log}); building (b)'s engine"
    )

    from vllm.v1.engine.async_llm import AsyncLLM

    t0 = time.monotonic()
    floor = Engine(settings)  # (b): the service's engine arguments and sampling parameters
    try:
        if gpu:  # one at a time: vLLM's memory profiling counts another engine's allocations as its own
            wait_ready([inference], 600)
        # synchronous on purpose (the service's engine loads in its own process meanwhile): a
        # Ctrl-C then interrupts it here, where a thread running it (Engine.start) could not be
        floor.llm = AsyncLLM.from_engine_args(engine_args(settings, gpu))
        console.print(f"(b) engine ready in {time.monotonic() - t0:.0f}s")
        wait_ready([inference], 400)
        console.print(f"(a) service ready {time.monotonic() - t0:.0f}s after its start")

        # ---- workload: rendered once, outside any timing
        store_client = StoreClient(store.url)
        renderer = Renderer.from_pretrained(model)
        layout = Layout.from_pretrained(model)
        greedy = SamplingOptions(max_tokens=opts["max_tokens"], temperature=0.0)
        paths = Paths(
            floor.llm,
            AsyncInferenceClient(inference.url, timeout=300, retries=0, transport=AiohttpTransport()),
            floor.sampling_params(greedy, image_markup_ids(renderer.tokenizer, layout)),
            opts["max_tokens"],
        )
        t0 = time.monotonic()
        warmup_imgs = build_images(1, 1, seed=7_000_000)
        sets = [
            build_images(opts["convs"], opts["turns"], seed=1_000_000 * (k + 1))
            for k in range(opts["cold_sets"])
        ]
        warm_conv = render_conversations(renderer, store_client, warmup_imgs, "warmup")[0]
        convs = [
            c for k, s in enumerate(sets) for c in render_conversations(renderer, store_client, s, f"s{k}c")
        ]
        all_blobs = [b for s in [warmup_imgs, *sets] for conv in s for turn in conv for b in turn]
        for data in all_blobs:  # (b) gets the decoded images; decoding is not part of its latency
            paths.decoded[compute_digest(data)] = decode.decode_rgb(data)
        tokens = sorted({d.num_tokens for c in convs for t in c for d in t.descriptors})
        console.print(
            f"workload: {len(convs)} conversations x {opts['turns']} turns, {len(all_blobs)} images "
            f"(tokens per image {tokens}), rendered in {time.monotonic() - t0:.1f}s"
        )

        # ---- warm-up (not counted): vLLM's first multimodal request is slow
        t0 = time.monotonic()
        for _ in range(2):
            await run_block(paths, "warmup", warm_conv, False, 0)
        console.print(f"warm-up done in {time.monotonic() - t0:.1f}s")

        # ---- measured passes
        samples: list[Sample] = []
        block = 0
        counters = {}  # the service's image path over each phase: store pixels or decodes
        for phase, passes in (("cold", 1), ("warm", opts["warm_passes"])):
            counters[phase] = service_counters(inference.url)
            for _ in range(passes):
                t0 = time.monotonic()
                for conv in convs:
                    await asyncio.sleep(opts["gap"])
                    samples += await run_block(paths, phase, conv, block % 2 == 1, opts["gap"])
                    block += 1
                s = [x for x in samples if x.phase == phase]
                console.print(
                    f"  {phase}: {len(s)} requests so far, overhead p50 "
                    f"{med([x.overhead_s * 1e3 for x in s]):+.1f} ms ({time.monotonic() - t0:.1f}s)"
                )
        await paths.client.close()
        cold_path = {k: counters["warm"][k] - counters["cold"][k] for k in ("store_pixels", "decodes")}

        costs = await per_image_costs(
            store.url,
            {
                "1280x720 screenshot PNG": [turn[0] for s in sets for conv in s for turn in conv],
                "640x480 photo JPEG": [turn[1] for s in sets for conv in s for turn in conv],
            },
        )
        transfer_ms = statistics.mean(c["get_ms"] for c in costs.values())
        store_client.close()
    finally:
        floor.shutdown()

    summaries = [summarize(p, samples, transfer_ms) for p in ("cold", "warm")]
    turns = {p: by_turn(samples, p) for p in ("cold", "warm")}
    for t in console_tables(summaries, turns):
        console.print(t)
    console.print(f"cold image costs here (median per image): {costs_text(costs)}")
    import torch
    import transformers
    import vllm

    report = {
        "model": model_text(model),
        "engine": engine_text(engine),
        "engine_settings": settings,
        "load_before": load_before,
        "load_after": loadavg(),
        "versions": f"vLLM {vllm.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}",
        "tokens": "is " + " or ".join(map(str, tokens)) + " tokens",
        "cold_path": cold_path,
        **opts,
        "command": f"{env_prefix()}python bench/inference_bench.py "
        f"--convs {opts['convs']} --turns {opts['turns']} --cold-sets {opts['cold_sets']} "
        f"--warm-passes {opts['warm_passes']} --max-tokens {opts['max_tokens']} --gap {opts['gap']:g} "
        f"--max-model-len {opts['max_model_len']}" + (" --cuda-graphs" if opts["cuda_graphs"] else ""),
    }
    if opts["write"]:
        info = machine()  # a GPU run has its own section: a CPU run never replaces its figures
        section = "inference_bench_gpu" if info["gpu"] else "inference_bench"
        write_section(opts["output"], section, markdown(summaries, turns, costs, info, report))
        console.print(f"wrote the Inference section of {opts['output']}")
    console.print(f"done in {time.monotonic() - t_start:.0f}s; load average {loadavg()}")


@app.command()
def main(
    convs: Annotated[int, typer.Option(help="conversations per image set")] = 4,
    turns: Annotated[int, typer.Option(help="turns per conversation (2 new images each)")] = 5,
    cold_sets: Annotated[int, typer.Option(help="image sets measured cold (each new to both engines)")] = 2,
    warm_passes: Annotated[int, typer.Option(help="warm passes over the same conversations")] = 2,
    max_tokens: Annotated[int, typer.Option(help="tokens sampled per request (greedy)")] = 8,
    gap: Annotated[float, typer.Option(help="seconds between blocks (idle worker stops busy-polling)")] = 1.1,
    max_model_len: Annotated[int, typer.Option(help="vLLM max_model_len on both paths")] = 4096,
    cuda_graphs: Annotated[
        bool | None,
        typer.Option(
            "--cuda-graphs/--eager",
            help="CUDA graphs + torch.compile on both paths (enforce_eager off), or eager "
            "(default: eager; MMSTORE_BENCH_EAGER=0: CUDA graphs)",
            show_default=False,
        ),
    ] = None,
    output: OutputOption = RESULTS,
    write: WriteOption = True,
    keep_tmp: KeepTmpOption = False,
) -> None:
    """Measure the service's overhead over in-process vLLM, cold and warm; print and record it."""
    if 2 * turns > MAX_IMAGES:
        raise typer.BadParameter(f"turn {turns} would carry {2 * turns} images, over {MAX_IMAGES}")
    # unwind through the finally blocks; SIGINT too: inside the event loop, not only as task cancellation
    interrupt_on(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    opts = dict(
        convs=convs,
        turns=turns,
        cold_sets=cold_sets,
        warm_passes=warm_passes,
        max_tokens=max_tokens,
        gap=gap,
        max_model_len=max_model_len,
        cuda_graphs=cuda_graphs,
        output=output,
        write=write,
    )
    tmp = Path(tempfile.mkdtemp(prefix="mmstore-infbench-"))
    stack = Stack(tmp)
    with cleanup(stack, [tmp], keep_tmp):
        asyncio.run(bench(opts, stack, tmp))


if __name__ == "__main__":
    app()
