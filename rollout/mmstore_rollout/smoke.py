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

This module orchestrates; the parts live beside it: the rollout worker (:mod:`.worker`), the
services' counters it reads (:mod:`.service_metrics`), the training step (:mod:`.training`), the
summary and its table (:mod:`.summary`).
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack, ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmstore_client import AsyncStoreClient, MmstoreError
from mmstore_client.inference import AsyncInferenceClient, SamplingOptions
from mmstore_client.render import Renderer
from mmstore_client.transport import AiohttpTransport
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .balancer import balancer_service, log_length, log_stats, upstream_key
from .env import ENVS
from .plots import write_plots
from .service_metrics import replica_report, scrape_replica, service_counters
from .stack import EngineOptions, Service, Stack, inference_replicas, store_service, vllm_service, wait_ready
from .stats import LoopStats
from .summary import Summary, console
from .training import train_on_samples
from .vllm_serve import VllmServeInference
from .worker import RolloutWorker


class SmokeFailed(RuntimeError):
    """The loop could not finish; the message says which part failed and where its log is."""


@dataclass
class SmokeConfig:
    out: Path = Path("runs/smoke")
    model: Path | None = None  # None: the default tiny model (Qwen2-VL), built into .cache/ if absent
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
            inference = await engines.enter_async_context(
                AsyncInferenceClient(inference_url, transport=AiohttpTransport())
            )
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


def run_smoke(cfg: SmokeConfig) -> Summary:
    from mmstore_client.samples import write_samples
    from mmstore_trainer.tiny_model import ensure_default_tiny_model

    cfg.out.mkdir(parents=True, exist_ok=True)
    summary, stats, wall, collected = Summary(), LoopStats(), {}, {}
    t0 = time.perf_counter()
    model = cfg.model or ensure_default_tiny_model(tools=ENVS[cfg.env].tools is not None)
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
        _record_replicas(summary, cfg, served, before, log_start)
        samples_file = cfg.out / "samples.jsonl"
        write_samples(samples_file, samples)

        t = time.perf_counter()
        trainer = train_on_samples(
            model,
            samples_file,
            store_url,
            cfg.out / "trainer",
            steps=cfg.train_steps,
            batch_size=cfg.group_size * 2,
            temperature=cfg.temperature,
        )
        wall["train"] = time.perf_counter() - t
        summary.store, summary.inference = service_counters(store_url, [u for _, u in served.replicas])

    wall["total"] = time.perf_counter() - t0
    summary.record_loop(stats)
    summary.record_trainer(trainer)
    summary.wall_s = {k: round(v, 2) for k, v in wall.items()}
    summary.samples_file = str(samples_file)
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


def _record_replicas(
    summary: Summary, cfg: SmokeConfig, served: _Inference, before: dict, log_start: int
) -> None:
    """Per replica, what it did over the rollouts; with several, what nginx saw of each."""
    if cfg.engine == "inference":  # stock vLLM has none of mmstore-inference's counters
        summary.replicas = [replica_report(n, u, before[n], scrape_replica(u)) for n, u in served.replicas]
    if not served.balancer:
        return
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
