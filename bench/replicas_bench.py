"""Two inference replicas behind nginx: round-robin against affinity routing, one workload.

Run: ``.venv/bin/python bench/replicas_bench.py`` (about 6 minutes on 2 cores: most of it is the
two engine starts of each mode).

The workload is the smoke loop's multi-turn GRPO rollouts, played by the real
:class:`~mmstore_rollout.worker.RolloutWorker`: ``--groups`` rollout groups (environment seeds)
of ``--n`` samples each, ``--turns`` turns with one new picture per turn (each request carries
every picture so far), temperature 1, all groups in flight at once (``--concurrency``). The
first turn samples the group's prompt ``n`` times in one request; every later turn is one
request per trajectory, bridged onto the ids as sampled.

It runs twice, on the same store, each time on two fresh replicas (``mmstore-inference serve``,
vLLM CPU, tiny Qwen2-VL: cold caches) behind a fresh nginx started by the stack:

- ``round-robin``: the worker sends no affinity header;
- ``affinity``: the worker sends the group's id as ``X-Mmstore-Affinity`` (nginx: consistent hash).

Per mode: requests, errors, retries (the client's and nginx's), store fetches and bytes fetched by
the replicas (each replica's ``/metrics``), our cache hit ratio, vLLM's prefix-cache and processor-
cache hit ratios, and the request latency the worker sees (p50/p99). Prints the table and rewrites
the ``replicas_bench`` section of ``bench/RESULTS.md`` (between its markers; appended if absent).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from benchlib import ROOT, interrupt_on, loadavg, machine, make_app, write_section

SECTION = "replicas_bench"
MODES = ("round-robin", "affinity")
app = make_app(__doc__)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def play(opts: dict, store_url: str, url: str, model: Path, run: str, affinity: bool) -> dict:
    """The workload through ``url`` (the balancer); what the worker saw."""
    from mmstore_client import AsyncStoreClient
    from mmstore_client.inference import AsyncInferenceClient, SamplingOptions
    from mmstore_client.render import Renderer
    from mmstore_rollout.stats import LoopStats
    from mmstore_rollout.worker import RolloutWorker

    class TimedClient(AsyncInferenceClient):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.latencies: list[tuple[int, float]] = []  # (turn, seconds)

        async def generate(self, request, *, affinity=None):
            t = time.perf_counter()
            try:
                return await super().generate(request, affinity=affinity)
            finally:  # turn k carries k+1 pictures
                self.latencies.append((len(request.descriptors) - 1, time.perf_counter() - t))

    stats = LoopStats()
    failures: list[str] = []
    async with AsyncStoreClient(store_url) as store, TimedClient(url) as client:
        renderer = await asyncio.to_thread(Renderer.from_pretrained, model)
        sampling = SamplingOptions(max_tokens=opts["max_tokens"], temperature=1.0)
        worker = RolloutWorker(
            store, client, renderer, run, stats, sampling, upload_rollouts=False, affinity=affinity
        )
        gate = asyncio.Semaphore(opts["concurrency"])

        async def group(seed: int) -> None:
            async with gate:
                try:
                    await worker.rollout_group(seed, opts["turns"], opts["n"])
                except Exception as exc:  # counted; the other groups go on
                    failures.append(f"group {seed}: {exc!r}")

        t = time.perf_counter()
        await asyncio.gather(*(group(seed) for seed in range(opts["groups"])))
        wall = time.perf_counter() - t
    return {
        "requests": stats.generate_requests,
        "samples": stats.rollouts,
        "errors": stats.inference_errors,
        "failed_groups": failures,
        "client_retries": stats.inference_retries,
        "latencies": [s for _, s in client.latencies],
        "first_turn": [s for turn, s in client.latencies if turn == 0],
        "later_turns": [s for turn, s in client.latencies if turn > 0],
        "fetch_s": worker.fetch_s,  # the replicas' own timings.fetch_s (fetch, verify, decode)
        "wall_s": wall,
        "unique_images": len(stats.digests),
    }


def run_mode(opts: dict, mode: str, store_url: str, model: Path, tmp: Path) -> dict:
    from mmstore_rollout import balancer as lb
    from mmstore_rollout.service_metrics import replica_report, scrape_replica, totals
    from mmstore_rollout.stack import Stack, inference_replicas, wait_ready

    stack = Stack(tmp / mode)
    try:
        t = time.perf_counter()
        replicas = [stack.start(r) for r in inference_replicas(model, store_url, stack.workdir, 2)]
        wait_ready(replicas, 600)
        balancer = stack.start(lb.balancer_service([r.url for r in replicas], stack.workdir))
        wait_ready([balancer], 30)
        print(f"[{mode}] 2 replicas ready in {time.perf_counter() - t:.0f}s", flush=True)
        before = {r.name: scrape_replica(r.url) for r in replicas}
        since = lb.log_length(balancer.access_log)
        run = f"bench-replicas-{mode}"
        seen = asyncio.run(play(opts, store_url, balancer.url, model, run, affinity=mode == "affinity"))
        reports = [replica_report(r.name, r.url, before[r.name], scrape_replica(r.url)) for r in replicas]
        nginx = lb.log_stats(balancer.access_log, since=since)
    finally:
        stack.stop()
    seen.update(replicas=reports, total=totals(reports), nginx=nginx.to_dict())
    lat = seen["latencies"]
    print(
        f"[{mode}] {seen['requests']} requests in {seen['wall_s']:.1f}s, errors {seen['errors']}, "
        f"store fetches {seen['total']['store_fetches']}, p50 {pct(lat, 50) * 1000:.0f} ms",
        flush=True,
    )
    return seen


def _lat(values: list[float]) -> str:
    return f"{pct(values, 50) * 1000:.0f} / {pct(values, 99) * 1000:.0f} ms ({len(values)})"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def markdown(results: dict[str, dict], info: dict) -> str:
    rr, af = results["round-robin"], results["affinity"]

    def split(res: dict, key: str) -> str:
        return " / ".join(str(r.get(key, "down")) for r in res["replicas"])

    def row(name: str, f) -> str:
        return f"| {name} | {f(rr)} | {f(af)} |"

    rows = [
        "| | round-robin (no header) | affinity (`X-Mmstore-Affinity`: group id) |",
        "|---|---|---|",
        row("generate requests (replica 1 / 2)", lambda r: f"{r['requests']} ({split(r, 'requests')})"),
        row("samples (trajectories)", lambda r: str(r["samples"])),
        row(
            "errors (client / replicas' non-ok answers)",
            lambda r: f"{r['errors']} / {r['total']['errors']}",
        ),
        row(
            "retries (client / nginx failover)", lambda r: f"{r['client_retries']} / {r['nginx']['retries']}"
        ),
        row(
            "**store fetches** (replica 1 / 2)",
            lambda r: f"**{r['total']['store_fetches']}** ({split(r, 'store_fetches')})",
        ),
        row("bytes fetched from the store", lambda r: f"{r['total']['bytes_fetched']:,}"),
        row(
            "our cache hit ratio (images served from the replica's caches)",
            lambda r: _ratio(r["total"]["cache_hit_ratio"]),
        ),
        row(
            "**vLLM prefix-cache hit ratio** (prompt tokens)",
            lambda r: (
                f"**{_ratio(r['total']['prefix_cache_hit_ratio'])}** "
                f"({r['total']['prefix_cache_hit_tokens']:,} / {r['total']['prefix_cache_query_tokens']:,})"
            ),
        ),
        row(
            "vLLM processor-cache hit ratio (replica 1 / 2)",
            lambda r: " / ".join(_ratio(x.get("mm_cache_hit_ratio")) for x in r["replicas"]),
        ),
        row("request latency p50 / p99, all requests", lambda r: _lat(r["latencies"])),
        row("... first turn (n samples; cold engines)", lambda r: _lat(r["first_turn"])),
        row("... later turns", lambda r: _lat(r["later_turns"])),
        row(
            "replica's image fetch+verify+decode per request, mean / max (`timings.fetch_s`)",
            lambda r: f"{statistics.fmean(r['fetch_s']) * 1000:.1f} / {max(r['fetch_s']) * 1000:.1f} ms",
        ),
        row("wall time of the workload", lambda r: f"{r['wall_s']:.1f} s"),
    ]
    fetch_ratio = af["total"]["store_fetches"] / max(1, rr["total"]["store_fetches"])
    errors = sum(r["errors"] + r["total"]["errors"] + len(r["failed_groups"]) for r in (rr, af))
    prefix_up = (af["total"]["prefix_cache_hit_ratio"] or 0) > (rr["total"]["prefix_cache_hit_ratio"] or 0)
    unique = af["unique_images"]
    verdict = [
        f"- errors in both: **{errors}** (target 0: {'met' if errors == 0 else 'NOT met'})",
        f"- store fetches, affinity / round-robin: **{fetch_ratio:.2f}** (target at most 0.5: "
        f"{'met' if fetch_ratio <= 0.5 else 'NOT met'}). The workload has {unique} distinct pictures: "
        f"with affinity each is fetched by the one replica of its group, {af['total']['store_fetches']} "
        f"fetches; round-robin can fetch each at most twice ({2 * unique}) and did "
        f"{rr['total']['store_fetches']}, so 0.5 is the floor of this ratio on 2 replicas, reached only "
        "when round-robin sends every picture to both.",
        f"- vLLM prefix-cache hit ratio higher with affinity: **{'yes' if prefix_up else 'no'}** "
        f"({_ratio(af['total']['prefix_cache_hit_ratio'])} vs "
        f"{_ratio(rr['total']['prefix_cache_hit_ratio'])})",
    ]
    failed = [f for r in (rr, af) for f in r["failed_groups"]]
    lines = [
        "## Inference replicas: round-robin vs affinity",
        "",
        f"`{info['command']}` on {info['machine']}; {info['versions']}; {info['date']}; load average "
        f"before {info['load_before']}, after {info['load_after']}.",
        "",
        f"Workload: {info['opts']['groups']} GRPO groups x {info['opts']['n']} samples x "
        f"{info['opts']['turns']} turns, one new picture per turn (turn k carries k+1 pictures), "
        f"{info['opts']['max_tokens']} tokens per completion at temperature 1, all groups in flight; "
        f"the smoke loop's rollout worker through nginx (Debian's, started by the stack) in front of 2 "
        "fresh `mmstore-inference` replicas (vLLM CPU, tiny Qwen2-VL, float32, eager) per mode, on one "
        "store. Per-replica figures from each replica's `/metrics`, nginx's from its access log.",
        "",
        *rows,
        "",
        *verdict,
        *(["", "Failed groups:", *[f"- {f}" for f in failed]] if failed else []),
        "",
        "\n\n".join(info["reading"]),
    ]
    return "\n".join(lines) + "\n"


def bench(opts: dict, tmp: Path) -> None:
    import torch
    import transformers
    import vllm
    from mmstore_rollout.stack import Stack, store_service, wait_ready
    from mmstore_trainer.tiny_model import ensure_default_tiny_model

    load_before = loadavg()
    model = ensure_default_tiny_model(ROOT)
    store_stack = Stack(tmp / "store")
    try:
        store = store_stack.start(store_service(store_stack.workdir, root=tmp / "store-data"))
        wait_ready([store], 60)
        results = {mode: run_mode(opts, mode, store.url, model, tmp) for mode in MODES}
    finally:
        store_stack.stop()
    reading = [
        "Reading: every request carries every picture's ref, so either routing is correct; what "
        "routing changes is what each replica already holds. With affinity a group's requests (its "
        "first turn with n samples, then each trajectory's turns) reach one replica, which fetches "
        "and decodes each picture once, and whose prefix cache holds the conversation so far: turn k+1 "
        "extends turn k's prompt and completion. Round-robin spreads the same requests over both "
        "replicas, so both fetch most pictures, and a trajectory's next turn usually lands on the "
        "replica that did not see its previous turn (only the prefix shared further back hits).",
        f"Latency here is two CPU engines (tiny model) sharing {os.cpu_count()} cores, and it mixes "
        "effects this bench does not separate: affinity's cache hits (fewer fetches and decodes, "
        "prefill skipped for cached prefix blocks), where the hash put the groups (it does not "
        "balance load: with 8 groups one replica can get most or all of them, and on 2 shared cores "
        "one busy engine contends less than two), and other load on the machine (load averages "
        "above). The first turn (8 requests of n samples at once, cold engines) dominates p99. The "
        "store-fetch and prefix-cache rows do not depend on timing: they reproduce run to run.",
    ]
    m = machine()
    info = {
        "machine": f"{m['cpu']}, {m['nproc']} CPUs, {m['memory']} RAM, Python {m['python']}",
        "versions": f"vLLM {vllm.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}",
        "date": m["date"],
        "load_before": load_before,
        "load_after": loadavg(),
        "opts": opts,
        "reading": reading,
        "command": f"python bench/replicas_bench.py --groups {opts['groups']} --turns {opts['turns']} "
        f"--n {opts['n']} --max-tokens {opts['max_tokens']} --concurrency {opts['concurrency']}",
    }
    section = markdown(results, info)
    print(section)
    if opts["write"]:
        write_section(opts["output"], SECTION, section)
        print(f"wrote the replicas_bench section of {opts['output']}")


@app.command()
def main(
    groups: Annotated[int, typer.Option(help="GRPO groups (rollout ids, environment seeds)")] = 8,
    turns: Annotated[int, typer.Option(help="turns per rollout (one new picture each)")] = 5,
    n: Annotated[int, typer.Option(help="samples per group")] = 4,
    max_tokens: Annotated[int, typer.Option(help="tokens per completion")] = 8,
    concurrency: Annotated[int, typer.Option(help="groups in flight at once")] = 8,
    output: Annotated[Path, typer.Option(help="results file (its replicas_bench section)")] = ROOT
    / "bench"
    / "RESULTS.md",
    write: Annotated[bool, typer.Option(help="rewrite the section of the results file")] = True,
    keep_tmp: Annotated[
        bool, typer.Option(help="keep the temporary folder (logs, nginx access logs)")
    ] = False,
) -> None:
    """Round-robin vs affinity on 2 replicas behind nginx; print and record the results."""
    if turns > 16:
        raise typer.BadParameter("at most 16 pictures per prompt (the service's default limit)")

    interrupt_on(signal.SIGTERM, signal.SIGHUP)  # unwind through the finally blocks: stop everything
    opts = dict(
        groups=groups,
        turns=turns,
        n=n,
        max_tokens=max_tokens,
        concurrency=concurrency,
        output=output,
        write=write,
    )
    tmp = Path(tempfile.mkdtemp(prefix="mmstore-replicasbench-"))
    t = time.monotonic()
    try:
        bench(opts, tmp)
    except KeyboardInterrupt:
        print("interrupted")
        raise typer.Exit(130) from None
    finally:
        if keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"done in {time.monotonic() - t:.0f}s; load average {loadavg()}")


if __name__ == "__main__":
    app()
