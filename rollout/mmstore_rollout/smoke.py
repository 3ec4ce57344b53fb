"""The main job (``make smoke``): a multi-turn visual RL loop over the real local stack.

1. build the tiny model if absent (or use ``--model``);
2. start ``mmstore serve`` and ``mmstore-inference serve`` on free loopback ports (or use
   ``--store`` / ``--inference``) and wait until both are ready; with ``--replicas N`` (N > 1),
   N inference replicas behind nginx (consistent hashing on the group's affinity header);
3. several concurrent rollout workers play multi-turn groups (offload, render, generate with n
   samples, bridge, reward, group advantages) and write training samples (JSONL);
4. the trainer materializes the refs, trains a few steps and saves a checkpoint;
5. a summary (printed, and ``summary.json`` in the run folder) with the invariants that prove
   the parts agreed: placeholder mismatches 0, processed payloads 0; and per inference replica
   its requests, store fetches, bytes fetched and cache hit ratios (``replicas``).
Everything it started is stopped at the end, on failure and on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack, ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from mmstore import metrics as sm
from mmstore_client import AsyncStoreClient, MmstoreError
from mmstore_client.inference import AsyncInferenceClient, SamplingOptions
from mmstore_client.render import Renderer
from mmstore_inference import metrics as im
from mmstore_inference.errors import PlaceholderMismatch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .balancer import balancer_service, log_length, log_stats, upstream_key
from .env import ENVS
from .plots import write_plots
from .stack import EngineOptions, Service, Stack, inference_replicas, store_service, vllm_service, wait_ready
from .stats import (
    VLLM_MM_CACHE_HITS,
    VLLM_PREFIX_CACHE_HITS,
    LoopStats,
    metric,
    replica_report,
    scrape_replica,
)
from .vllm_serve import VllmServeInference
from .worker import RolloutWorker

console = Console(stderr=True)


class SmokeFailed(RuntimeError):
    """The loop could not finish; the message says which part failed and where its log is."""


@dataclass
class SmokeConfig:
    out: Path = Path("runs/smoke")
    model: Path | None = None  # None: the tiny Qwen2-VL, built into .cache/ if absent
    store: str | None = None  # None: start one
    inference: str | None = None  # None: start one (or ``replicas``)
    replicas: int = 1  # inference replicas to start; more than 1: behind nginx
    engine: str = "inference"  # "inference" (mmstore-inference) or "vllm-serve" (stock vLLM + plugin)
    replica_urls: list[str] = field(default_factory=list)  # use these running replicas (nginx in front)
    affinity: bool = True  # send the group's id as X-Mmstore-Affinity (consistent hashing in nginx)
    groups: int = 6
    group_size: int = 4
    turns: int = 3
    workers: int = 3
    max_tokens: int = 8
    max_model_len: int = 4096  # the inference services' context (stack default)
    temperature: float = 1.0
    train_steps: int = 3
    run: str = "smoke"
    env: str = "shapes"  # the environment (env.ENVS): shapes, or click (a tool-using agent)
    ready_timeout: float = 420.0


@dataclass
class Summary:
    rollouts: int = 0
    turns: int = 0
    generate_requests: int = 0
    images: int = 0
    unique_digests: int = 0
    bytes_refs: int = 0
    bytes_base64: int = 0
    bytes_pixel_values: int = 0
    placeholder_mismatches: int = 0
    processed_payloads: int = 0
    missing_images: int = 0
    inference_retries: int = 0  # re-sent by the inference client (transport error, 503)
    context_stops: int = 0  # trajectories ended before a turn that would not fit max_model_len
    inference_errors: int = 0  # generate requests that failed for good
    balancer_retries: int = 0  # attempts nginx moved to another replica (replica down or failing)
    mean_reward: float = 0.0
    store: dict = field(default_factory=dict)
    inference: dict = field(default_factory=dict)
    replicas: list[dict] = field(default_factory=list)  # per inference replica, over the rollouts
    balancer: dict = field(default_factory=dict)  # nginx's view (several replicas only)
    trainer: dict = field(default_factory=dict)
    loss_per_step: list[float] = field(default_factory=list)
    wall_s: dict[str, float] = field(default_factory=dict)
    samples_file: str = ""
    checkpoint: str = ""
    rollout_docs: int = 0  # RolloutDocs uploaded for the viewer (run "<run>.rollouts")
    viewer: str = ""  # where to look at them
    plots: list[str] = field(default_factory=list)


def _service_counters(store_url: str, inference_urls: list[str]) -> tuple[dict, dict]:
    """The store's counters, and the inference counters summed over the replicas that answer."""
    s = httpx.get(f"{store_url}/metrics", timeout=10).text
    texts = []
    for url in inference_urls:
        try:
            texts.append(httpx.get(f"{url}/metrics", timeout=10).text)
        except httpx.HTTPError:
            if len(inference_urls) == 1:
                raise
    store = {
        "blobs_created": metric(s, sm.BLOBS_CREATED),
        "uploads_deduplicated": metric(s, sm.BLOBS_DEDUPLICATED),
        "bytes_in": metric(s, sm.BYTES_IN),
        "bytes_out": metric(s, sm.BYTES_OUT),
    }
    names = {
        "store_fetches": im.STORE_FETCHES,
        "byte_cache_hits": im.BYTE_CACHE_HITS,
        "decoded_cache_hits": im.DECODED_CACHE_HITS,
        "prefix_cache_hit_tokens": VLLM_PREFIX_CACHE_HITS,
        "mm_cache_hits": VLLM_MM_CACHE_HITS,
        "placeholder_mismatch_errors": f'{im.REQUESTS}{{code="{PlaceholderMismatch.code}"}}',
    }
    inference = {key: sum(metric(i, name) for i in texts) for key, name in names.items()}
    return store, inference


@dataclass
class _Inference:
    """Where the loop sends generate requests, and the replicas behind it."""

    url: str
    replicas: list[tuple[str, str]]  # (name, url)
    balancer: Service | None = None


def _start_inference(cfg: SmokeConfig, stack: Stack, model: Path, store_url: str) -> _Inference:
    if cfg.replicas < 1:
        raise ValueError("replicas must be at least 1")
    if cfg.inference and (cfg.replicas > 1 or cfg.replica_urls):
        raise ValueError("give either an inference URL or replicas (started, or their URLs), not both")
    if cfg.engine not in ("inference", "vllm-serve"):
        raise ValueError(f"engine {cfg.engine!r}: use 'inference' or 'vllm-serve'")
    if cfg.engine == "vllm-serve" and cfg.replicas > 1:
        raise ValueError("--engine vllm-serve runs one stock vLLM server: leave --replicas at 1")
    if cfg.inference:
        return _Inference(cfg.inference, [("inference", cfg.inference)])
    engine = EngineOptions.here(cfg.max_model_len)
    if cfg.engine == "vllm-serve":
        served = stack.start(vllm_service(model, stack.workdir, engine=engine, store_url=store_url))
        return _Inference(served.url, [(served.name, served.url)])
    if cfg.replica_urls:
        urls = [u.rstrip("/") for u in cfg.replica_urls]
        names = [f"replica-{i}" for i in range(1, len(urls) + 1)] if len(urls) > 1 else ["inference"]
        replicas = list(zip(names, urls, strict=True))
    else:
        started = [
            stack.start(s)
            for s in inference_replicas(model, store_url, stack.workdir, cfg.replicas, engine=engine)
        ]
        replicas = [(s.name, s.url) for s in started]
    if len(replicas) == 1:
        return _Inference(replicas[0][1], replicas)
    balancer = stack.start(balancer_service([url for _, url in replicas], stack.workdir))
    return _Inference(balancer.url, replicas, balancer)


async def _rollouts(
    cfg: SmokeConfig,
    store_url: str,
    inference_url: str,
    model: Path,
    stats: LoopStats,
    progress,
    collected: dict | None = None,
) -> list:
    async with AsyncStoreClient(store_url) as store, AsyncExitStack() as engines:
        renderer = await asyncio.to_thread(Renderer.from_pretrained, model)
        if cfg.engine == "vllm-serve":
            inference = await engines.enter_async_context(VllmServeInference(inference_url, renderer, store))
        else:
            inference = await engines.enter_async_context(AsyncInferenceClient(inference_url))
        sampling = SamplingOptions(max_tokens=cfg.max_tokens, temperature=cfg.temperature)
        worker = RolloutWorker(
            store,
            inference,
            renderer,
            cfg.run,
            stats,
            sampling,
            affinity=cfg.affinity,
            max_model_len=cfg.max_model_len,
            env=ENVS[cfg.env],
        )
        task = progress.add_task("rollout groups", total=cfg.groups)
        gate = asyncio.Semaphore(cfg.workers)
        samples = []

        async def group(seed: int) -> None:
            async with gate:
                samples.extend(await worker.rollout_group(seed, cfg.turns, cfg.group_size))
                progress.advance(task)

        try:
            await asyncio.gather(*(group(seed) for seed in range(cfg.groups)))
        finally:
            if collected is not None:  # for the plots and the summary
                collected.update(fetch_s=worker.fetch_s, rollout_docs=worker.rollout_docs)
        return sorted(samples, key=lambda s: s.sample_id)


def _train(cfg: SmokeConfig, model: Path, samples_file: Path, store_url: str) -> dict:
    from mmstore_trainer.config import TrainConfig
    from mmstore_trainer.train import train

    report = train(
        TrainConfig(
            model=model,
            data=[samples_file],
            out=cfg.out / "trainer",
            store=store_url,
            steps=cfg.train_steps,
            batch_size=cfg.group_size * 2,
            lr=1e-3,
            temperature=cfg.temperature,
            workers=2,
            progress=True,
        )
    )
    steps = [m.to_dict() for m in report.metrics]
    return {
        **report.extra,
        "steps": steps,
        "checkpoint": str(report.checkpoint or ""),
        "device": report.device,
        "missing_images": sum(m["missing_images"] for m in steps),
        "pixels_checked": sum(m["pixels_checked"] for m in steps),
        "pixel_mismatches": sum(m["pixel_mismatches"] for m in steps),
        "images": sum(m["images"] for m in steps),
        "fetched_bytes": sum(m["fetched_bytes"] for m in steps),
        "loader_wait_s": round(report.wait_s, 3),
        "wall_s": round(report.wall_s, 3),
    }


def run_smoke(cfg: SmokeConfig) -> Summary:
    from mmstore_trainer.samples import write_samples
    from mmstore_trainer.tiny_model import ensure_tiny_model

    cfg.out.mkdir(parents=True, exist_ok=True)
    summary, stats, wall, collected = Summary(), LoopStats(), {}, {}
    t0 = time.perf_counter()
    model = cfg.model or ensure_tiny_model(Path(".cache/tiny-models/qwen2_vl"), "qwen2_vl")
    wall["model"] = time.perf_counter() - t0
    with ExitStack() as stack_ctx:
        stack = stack_ctx.enter_context(Stack(cfg.out / "services"))
        t = time.perf_counter()
        store_url = cfg.store or stack.start(store_service(stack.workdir, root=cfg.out / "store-data")).url
        served = _start_inference(cfg, stack, model, store_url)
        inference_url = served.url
        engines = "the inference engines" if len(served.replicas) > 1 else "the inference engine"
        with console.status(f"waiting for mmstore and {engines} (vLLM start takes about a minute)"):
            wait_ready(stack.services, cfg.ready_timeout)
        wall["start_services"] = time.perf_counter() - t
        before = {name: scrape_replica(url) for name, url in served.replicas}
        log_start = log_length(served.balancer.access_log) if served.balancer else 0

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        with progress:
            t = time.perf_counter()
            try:
                samples = asyncio.run(
                    _rollouts(cfg, store_url, inference_url, model, stats, progress, collected)
                )
            except (MmstoreError, RuntimeError) as exc:
                dead = [
                    f"{s.name} exited with {s.proc.returncode} (log {s.log})"
                    for s in stack.services
                    if not s.alive()
                ]
                raise SmokeFailed(
                    f"rollouts failed after {stats.turns} turns: {exc}"
                    + (f"; {'; '.join(dead)}" if dead else "")
                ) from exc
            wall["rollouts"] = time.perf_counter() - t
        if cfg.engine == "inference":  # stock vLLM has none of mmstore-inference's counters
            summary.replicas = [
                replica_report(n, u, before[n], scrape_replica(u)) for n, u in served.replicas
            ]
        if served.balancer:
            lb = log_stats(served.balancer.access_log, since=log_start)
            for entry in summary.replicas:
                counts = lb.upstreams.get(upstream_key(entry["url"]))
                entry["balancer"] = vars(counts) if counts else {"attempts": 0, "served": 0, "failed": 0}
            summary.balancer = {
                "url": served.balancer.url,
                "routing": "affinity (consistent hash)" if cfg.affinity else "round-robin",
                "access_log": str(served.balancer.access_log),
                **lb.to_dict(),
            }
            summary.balancer_retries = lb.retries
        samples_file = cfg.out / "samples.jsonl"
        write_samples(samples_file, samples)

        t = time.perf_counter()
        trainer = _train(cfg, model, samples_file, store_url)
        wall["train"] = time.perf_counter() - t
        summary.store, summary.inference = _service_counters(store_url, [u for _, u in served.replicas])

    wall["total"] = time.perf_counter() - t0
    for name in (
        "rollouts",
        "turns",
        "generate_requests",
        "images",
        "bytes_refs",
        "bytes_base64",
        "bytes_pixel_values",
        "placeholder_mismatches",
        "processed_payloads",
        "missing_images",
        "inference_retries",
        "inference_errors",
        "context_stops",
    ):
        setattr(summary, name, getattr(stats, name))
    summary.unique_digests = len(stats.digests)
    summary.mean_reward = sum(stats.rewards) / max(1, len(stats.rewards))
    summary.trainer = trainer
    summary.missing_images += int(trainer.get("missing_images", 0))
    summary.loss_per_step = [s["loss"] for s in trainer.get("steps", [])]
    summary.wall_s = {k: round(v, 2) for k, v in wall.items()}
    summary.samples_file = str(samples_file)
    summary.checkpoint = str(trainer.get("checkpoint", ""))
    summary.rollout_docs = collected.get("rollout_docs", 0)
    summary.viewer = (
        f"{cfg.store}/ui/runs/{cfg.run}/rollouts"
        if cfg.store
        else f"mmstore serve --root {cfg.out / 'store-data'}, then http://127.0.0.1:8700/ui"
    )
    rewards_by_step: dict[int, list[float]] = {}
    for sample in samples:
        rewards_by_step.setdefault(int(sample.meta.get("seed", 0)), []).append(sample.reward or 0.0)
    plots = write_plots(
        cfg.out,
        rewards_by_step=rewards_by_step,
        loss_per_step=summary.loss_per_step,
        fetch_s=collected.get("fetch_s", []),
        bytes_refs=summary.bytes_refs,
        bytes_base64=summary.bytes_base64,
        bytes_pixel_values=summary.bytes_pixel_values,
    )
    summary.plots = [str(p) for p in plots]
    (cfg.out / "summary.json").write_text(json.dumps(asdict(summary), indent=2, default=str))
    return summary


def print_summary(summary: Summary, out: Path) -> None:
    table = Table(title=f"mmstore smoke run ({out / 'summary.json'})", show_header=False)
    st, inf = summary.store, summary.inference
    ratio = summary.bytes_pixel_values / max(1, summary.bytes_refs)
    rows = [
        (
            "rollouts / turns / generate requests",
            f"{summary.rollouts} / {summary.turns} / {summary.generate_requests}",
        ),
        ("images offloaded / unique digests", f"{summary.images} / {summary.unique_digests}"),
        ("bytes to inference as refs", f"{summary.bytes_refs:,}"),
        (
            "... as base64 would have been",
            f"{summary.bytes_base64:,} ({summary.bytes_base64 / max(1, summary.bytes_refs):.0f}x)",
        ),
        ("... as pixel_values would have been", f"{summary.bytes_pixel_values:,} ({ratio:.0f}x)"),
        (
            "store: blobs created / dedup uploads",
            f"{st.get('blobs_created', 0):.0f} / {st.get('uploads_deduplicated', 0):.0f}",
        ),
        (
            "inference: store fetches / byte cache hits",
            f"{inf.get('store_fetches', 0):.0f} / {inf.get('byte_cache_hits', 0):.0f}",
        ),
        (
            "inference: vLLM prefix-cache hit tokens",
            f"{summary.inference.get('prefix_cache_hit_tokens', 0):.0f}",
        ),
        (
            "trainer: images materialized / bytes fetched",
            f"{summary.trainer.get('images', 0)} / {summary.trainer.get('fetched_bytes', 0):,}",
        ),
        ("placeholder mismatches (must be 0)", str(summary.placeholder_mismatches)),
        ("processed payloads seen (must be 0)", str(summary.processed_payloads)),
        ("missing images", str(summary.missing_images)),
        (
            "trainer pixels = inference pixels (must be all)",
            f"{summary.trainer.get('pixels_checked', 0) - summary.trainer.get('pixel_mismatches', 0)}"
            f" / {summary.trainer.get('pixels_checked', 0)}",
        ),
        (
            "inference retries: client / balancer (failover)",
            f"{summary.inference_retries} / {summary.balancer_retries}",
        ),
        ("inference errors", str(summary.inference_errors)),
        ("mean reward", f"{summary.mean_reward:.3f}"),
        ("loss per step", ", ".join(f"{x:.4f}" for x in summary.loss_per_step)),
        ("wall time (s)", ", ".join(f"{k} {v}" for k, v in summary.wall_s.items())),
        ("checkpoint", summary.checkpoint),
        ("rollout documents (viewer)", f"{summary.rollout_docs}: {summary.viewer}"),
        ("plots", "\n".join(summary.plots)),
    ]
    at = next(i for i, row in enumerate(rows) if row[0].startswith("trainer: images"))
    rows[at:at] = _replica_rows(summary)
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _replica_rows(summary: Summary) -> list[tuple[str, str]]:
    rows = []
    if summary.balancer:
        rows.append(
            (
                "inference replicas",
                f"{len(summary.replicas)} behind nginx {summary.balancer['url']}, "
                f"routing: {summary.balancer['routing']}",
            )
        )
    for r in summary.replicas:
        lb = r.get("balancer")
        routed = f"; nginx sent {lb['served']} (+{lb['failed']} failed attempts)" if lb else ""
        if not r["alive"]:
            rows.append((f"  {r['name']} ({r['url']})", f"down at the end{routed}"))
            continue
        rows.append(
            (
                f"  {r['name']} ({r['url']})" if summary.balancer else f"replica {r['name']} ({r['url']})",
                f"{r['requests']} requests, {r['errors']} errors, {r['store_fetches']} store fetches "
                f"({r['bytes_fetched']:,} B); our cache hits {_pct(r['cache_hit_ratio'])}, "
                f"vLLM prefix cache {_pct(r['prefix_cache_hit_ratio'])}{routed}",
            )
        )
    return rows
