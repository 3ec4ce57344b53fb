"""Trainer loader throughput and how much of a training step waits on the loader.

Run: ``.venv/bin/python bench/trainer_bench.py`` (CPU, tiny Qwen2-VL), or on a GPU machine
``python bench/trainer_bench.py --device cuda --config qwen2-vl-2b`` (a Qwen2-VL-2B-sized model
with random weights, ``mmstore_trainer.tiny_model.build_qwen2_vl_2b``, built once under ``.cache/``:
nothing is downloaded). Starts its own
``mmstore serve`` from this repository (fresh temporary root, free port; no install needed:
``services/mmstore``, ``clients`` and ``trainer`` are put on the path), uploads
``--samples`` x ``--images-per-sample`` distinct JPEG images, renders one conversation per sample
with the renderer, then measures:

1. Loader throughput: every sample materialized (fetched from the store with a cold client
   cache, verified, decoded, run through the checkpoint's HF image processor, checked against
   its descriptors) with 0 workers (inline, sequential) and with 2 and 4 worker threads;
   images/s, samples/s and MB/s of image bytes. One untimed warm-up pass first.
2. Loader wait during training, in blocks: per worker setting ``--rounds`` rounds, each one block
   per trainer; a block is a fresh trainer running 1 untimed step (the pipeline's fill, the
   optimizer's state) then ``--steps`` timed steps (batch ``--batch-size``), every block on the
   same batches. Median and IQR of the step time, and the fraction of it spent blocked on the
   loader.
3. With ``--parallelism off,fsdp``, the trainer as one FSDP2 rank (the code path of ``torchrun
   --nproc-per-node N``, here a world of one: sharding, collectives and the full state dict
   machinery, no second GPU) against the single-process trainer on the same model, data and
   workers. The two alternate AB BA AB BA (each keeps its own model, built once, so nothing is
   rebuilt between blocks), and each round's ratio of the two block medians is one paired
   measurement: a drift of the machine's speed, which separate runs cannot tell from a difference
   of the trainers, cancels. "No slower" holds when the median ratio is <= 1 + half the ratios'
   IQR. On the lent H200, one command (``bench/gpu_run.sh trainer-fsdp``)::

       python bench/trainer_bench.py --device cuda --config qwen2-vl-2b --parallelism off,fsdp \\
           --workers 0,2 --rounds 4 --steps 3

   (target of issue 21: FSDP2 at one rank no slower than one process, loader wait < 5%).

Rewrites the ``## Trainer`` section of ``bench/RESULTS.md`` (between the ``trainer_bench``
markers; other sections are kept) unless ``--no-write``.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from benchlib import (
    RESULTS,
    ROOT,
    OutputOption,
    add_to_path,
    bench_model,
    cpu_model,
    loadavg,
    make_app,
    md_table,
    utc_now,
    write_section,
)
from mmstore_rollout.stack import store_service

add_to_path("clients", "trainer", "services/mmstore")  # run from a checkout without installing

RUN = "trainer-bench"

app = make_app(__doc__)


# --------------------------------------------------------------------------- store


@contextlib.contextmanager
def store_process(tmp: Path) -> Iterator[str]:
    """``mmstore serve`` on a free port with a fresh root; from the venv or from this checkout."""
    path = os.pathsep.join(
        [str(ROOT / "services/mmstore"), str(ROOT / "clients"), os.environ.get("PYTHONPATH", "")]
    )
    server = store_service(tmp, root=tmp / "store", env={**os.environ, "PYTHONPATH": path}).start()
    try:
        yield server.url
    finally:
        server.stop()


# --------------------------------------------------------------------------- model


def build_model(model_dir: Path, device: str, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device)


# --------------------------------------------------------------------------- data


def jpeg(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG (smooth gradients plus noise, quality 90), distinct for each seed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    pixels = np.clip(base * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 24, base.shape), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_samples(
    url: str, model_dir: Path, n: int, per_sample: int, width: int, height: int
) -> tuple[list, int]:
    """Upload distinct images and render one two-message conversation per sample."""
    from mmstore_client import StoreClient
    from mmstore_client.render import Renderer, image_refs
    from mmstore_client.samples import sample_from_rendered

    total = 0
    samples = []
    with StoreClient(url) as client:
        renderer = Renderer.from_pretrained(model_dir)
        for i in range(n):
            blobs = [jpeg(width, height, seed=i * per_sample + j) for j in range(per_sample)]
            total += sum(map(len, blobs))
            parts = [
                {"type": "image_url", "image_url": {"url": f"mmstore://blobs/{client.put(b, RUN).digest}"}}
                for b in blobs
            ]
            messages = [
                {
                    "role": "user",
                    "content": [*parts, {"type": "text", "text": "How many objects are there?"}],
                },
                {
                    "role": "assistant",
                    "content": f"Think step by step, then answer in one word. The answer is {i}.",
                },
            ]
            headers = client.image_headers(image_refs(messages))
            rendered = renderer.render(messages, headers, add_generation_prompt=False)
            samples.append(
                sample_from_rendered(rendered, sample_id=f"s{i}", advantages=1.0 if i % 2 else -1.0)
            )
    return samples, total


# --------------------------------------------------------------------------- measurements


def loader_pass(samples: list, url: str, model_dir: Path, processor: Any, workers: int) -> dict[str, float]:
    """Materialize every sample once with a cold client cache; throughput figures."""
    from mmstore_client import StoreClient
    from mmstore_trainer import Loader, Materializer

    with StoreClient(url) as client:
        materializer = Materializer.from_pretrained(model_dir, client, processor=processor)
        t0 = time.perf_counter()
        with Loader(samples, materializer, workers=workers, prefetch=max(8, 2 * workers)) as loader:
            done = list(loader)
        wall = time.perf_counter() - t0
    images = sum(len(m.images) for m in done)
    nbytes = sum(m.fetched_bytes for m in done)
    return {
        "workers": workers,
        "wall_s": wall,
        "samples_per_s": len(done) / wall,
        "images_per_s": images / wall,
        "mb_per_s": nbytes / wall / 1e6,
        "fetch_ms": 1e3 * sum(m.fetch_s for m in done) / images,
        "preprocess_ms": 1e3 * sum(m.preprocess_s for m in done) / images,
    }


def training_block(
    samples_path: Path,
    url: str,
    model_dir: Path,
    model: Any,
    processor: Any,
    workers: int,
    opts: dict,
    out: Path,
    parallelism: str = "off",
) -> list:
    """One block: a fresh trainer (optimizer, loader, cold client cache) runs ``opts["steps"]``
    steps on ``model`` with the loader at ``workers``; its per-step metrics. Every block starts
    from the same seed, so every block trains on the same batches in the same order.
    ``parallelism`` ``fsdp``: the trainer shards ``model`` (once; later blocks reuse it) as rank 0
    of the process group the caller made."""
    from mmstore_client import StoreClient
    from mmstore_trainer import TrainConfig, Trainer

    config = TrainConfig(
        model=model_dir,
        data=[samples_path],
        out=out,
        parallelism=parallelism,
        store=url,
        steps=opts["steps"],
        batch_size=opts["batch_size"],
        token_budget=opts["token_budget"],
        lr=1e-6,
        workers=workers,
        prefetch=max(8, 2 * workers, opts["batch_size"]),
        save_final=False,
        progress=False,
        gradient_checkpointing=opts["gradient_checkpointing"],
    )
    with (
        StoreClient(url) as client,
        Trainer(config, model=model, processor=processor, store=client) as trainer,
    ):
        report = trainer.run()
        del trainer.optimizer
    return report.metrics


def profile_blocks(path: Path, modes: list[str], block: Callable[[str], list]) -> None:
    """Run ``block(mode)`` for each trainer under torch.profiler; write where the time goes: the
    operators by self device time and by CPU time, and each block's step times (profiled, so
    slower than unprofiled ones: compare the trainers with each other, not with the rounds)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    parts = []
    for mode in modes:
        with torch_profile(activities=activities) as prof:
            metrics = block(mode)
        steps = ", ".join(f"{m.step_s:.3f}" for m in metrics)
        device_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        averages = prof.key_averages()
        parts += [
            f"=== {TRAINERS[mode]}: step s {steps}",
            averages.table(sort_by=device_key, row_limit=30, max_name_column_width=70),
            averages.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=70),
        ]
        typer.echo(f"profiled {TRAINERS[mode]}: step s {steps}")
    path.write_text("\n\n".join(parts) + "\n")
    typer.echo(f"wrote {path}")


def abba(modes: list[str], round_: int) -> list[str]:
    """The modes in round ``round_``: in order on even rounds, reversed on odd ones (AB BA AB
    BA...), so a drift in the machine's speed over the run weighs on every mode alike."""
    return modes if round_ % 2 == 0 else modes[::-1]


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = np.percentile(xs, [25, 50, 75])
    return float(q1), float(q2), float(q3)


def mode_summary(blocks: list[dict], mode: str, workers: int) -> dict[str, Any]:
    """One mode at one worker count: its timed steps pooled over the rounds."""
    mine = [b for b in blocks if b["mode"] == mode and b["workers"] == workers]
    timed = [m for b in mine for m in b["timed"]]
    q1, median, q3 = quartiles([m.step_s for m in timed])
    block_medians = [b["median_s"] for b in mine]
    return {
        "trainer": TRAINERS[mode],
        "workers": workers,
        "blocks": len(mine),
        "steps": len(timed),
        "median_s": median,
        "q1_s": q1,
        "q3_s": q3,
        # the same mode's block medians, highest over lowest: the drift that pairing removes
        "block_drift": max(block_medians) / min(block_medians) - 1,
        "wait_frac": sum(m.wait_s for m in timed) / sum(m.step_s for m in timed),
        "first_wait_frac": sum(b["first"].wait_s for b in mine) / sum(b["first"].step_s for b in mine),
        "tokens_per_step": sum(m.tokens for m in timed) / len(timed),
        "images_per_step": sum(m.images for m in timed) / len(timed),
        "micro_batches": sum(m.micro_batches for m in timed) / len(timed),
    }


def paired(blocks: list[dict], workers: int) -> dict[str, Any] | None:
    """FSDP2 over one process, round by round (each a ratio of the two blocks' median step
    times), at one worker count; None when one of the modes did not run."""
    rounds = sorted({b["round"] for b in blocks if b["workers"] == workers})
    by = {(b["round"], b["mode"]): b["median_s"] for b in blocks if b["workers"] == workers}
    ratios = [by[r, "fsdp"] / by[r, "off"] for r in rounds if (r, "fsdp") in by and (r, "off") in by]
    if not ratios:
        return None
    q1, median, q3 = quartiles(ratios)
    noise = (q3 - q1) / 2
    return {
        "workers": workers,
        "ratios": ratios,
        "median": median,
        "q1": q1,
        "q3": q3,
        "noise": noise,
        "slower_rounds": sum(r > 1 for r in ratios),
        "holds": median <= 1 + noise,
    }


# --------------------------------------------------------------------------- report


def machine(device: str) -> str:
    import torch
    import transformers

    cpu = cpu_model(default=platform.processor() or platform.machine())
    gpu = f", GPU {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    return (
        f"{os.cpu_count()} CPUs ({cpu}){gpu}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Linux {platform.release()}"
    )


LOAD_COLS = [
    "workers",
    "samples/s",
    "images/s",
    "MB/s",
    "wall s",
    "fetch ms/img",
    "preprocess ms/img",
    "speed-up",
    "passes (images/s)",
]
TRAINERS = {"off": "1 process", "fsdp": "FSDP2, 1 rank"}
RUN_COLS = [
    "trainer",
    "workers",
    "timed steps",
    "step s (median)",
    "IQR s",
    "block drift",
    "wait",
    "wait (1st steps)",
    "tokens/step",
    "images/step",
    "tokens/s",
    "images/s",
    "micro-batches",
]
PAIR_COLS = ["workers", "FSDP2 / 1 process, per round", "median", "IQR", "noise", "slower in", "no slower"]
WAIT_TARGET = 0.05  # loader wait under 5% of step time (issue), with background workers


def load_cells(r: dict, base: float) -> list[str]:
    return [
        str(r["workers"]),
        f"{r['samples_per_s']:.1f}",
        f"{r['images_per_s']:.1f}",
        f"{r['mb_per_s']:.1f}",
        f"{r['wall_s']:.2f}",
        f"{r['fetch_ms']:.1f}",
        f"{r['preprocess_ms']:.1f}",
        f"{r['images_per_s'] / base:.2f}x",
        r["spread"],
    ]


def run_cells(r: dict) -> list[str]:
    return [
        r["trainer"],
        str(r["workers"]),
        f"{r['blocks']} x {r['steps'] // r['blocks']}",
        f"{r['median_s']:.3f}",
        f"{r['q1_s']:.3f}-{r['q3_s']:.3f}",
        f"{100 * r['block_drift']:.0f}%",
        f"{100 * r['wait_frac']:.1f}%",
        f"{100 * r['first_wait_frac']:.0f}%",
        f"{r['tokens_per_step']:.0f}",
        f"{r['images_per_step']:.0f}",
        f"{r['tokens_per_step'] / r['median_s']:,.0f}",
        f"{r['images_per_step'] / r['median_s']:.1f}",
        f"{r['micro_batches']:.1f}",
    ]


def pair_cells(p: dict) -> list[str]:
    return [
        str(p["workers"]),
        ", ".join(f"{r:.3f}" for r in p["ratios"]),
        f"{p['median']:.3f}",
        f"{p['q1']:.3f}-{p['q3']:.3f}",
        f"±{100 * p['noise']:.1f}%",
        f"{p['slower_rounds']} of {len(p['ratios'])} rounds",
        "holds" if p["holds"] else f"no: {100 * (p['median'] - 1):+.1f}%",
    ]


def markdown(loads: list[dict], runs: list[dict], pairs: list[dict], info: dict[str, Any]) -> str:
    lines = [
        "## Trainer",
        "",
        f"Measured by `bench/trainer_bench.py` ({info['command']}). Model: {info['model']}. "
        f"Device: {info['device']}. Machine: {info['machine']}. Date: {info['date']}. "
        f"Load average before/after: {info['load']} (a shared machine: other processes compete).",
        "",
        f"Data: {info['samples']} samples x {info['per_sample']} distinct {info['width']}x{info['height']} "
        f"JPEG images (q90, {info['image_kb']:.0f} kB on average), one rendered two-message conversation "
        "per sample, served by a local `mmstore serve` (1 worker) on loopback.",
        "",
        "### Loader throughput",
        "",
        "Every sample materialized once: fetch by digest with a cold client cache (blake3 verified), decode "
        "(the decoding rule), the checkpoint's HF image processor, checks against the descriptors. "
        f"0 workers = inline, sequential. Median of {info['repeats']} passes (images/s of each pass in the "
        "last column). Fetch and preprocess are per-image worker times.",
        "",
        *md_table(LOAD_COLS, [load_cells(r, loads[0]["images_per_s"]) for r in loads], left=LOAD_COLS[-1:]),
        "",
        "### Step time waiting on the loader",
        "",
        f"Steps of {info['batch_size']} samples (token budget {info['token_budget']}, {info['precision']}), "
        f"in blocks: {info['rounds']} rounds per worker setting, each round one block per trainer "
        f"({info['order']}), a block = a fresh trainer (optimizer, loader, cold client cache) running "
        f"1 untimed step (it fills the loader's pipeline and allocates the optimizer's state) and then "
        f"{info['steps']} timed steps, every block on the same batches in the same order. Each trainer "
        "keeps its own model for the whole run (FSDP2 shards its copy in place, once), and one untimed "
        "2-step block per trainer first warms up kernels and the allocator. Step time: median and "
        "interquartile range of the timed steps of all blocks; block drift: the same trainer's slowest "
        "block median over its fastest (what the machine's drift does to runs that go one after the "
        "other); wait: time the timed steps spent blocked on the loader, as a fraction of their wall "
        "time (wait (1st steps): the untimed first steps, filling the pipeline).",
        "",
        *md_table(RUN_COLS, [run_cells(r) for r in runs], left=RUN_COLS[:1]),
        "",
        wait_target(runs),
        "",
        *fsdp_versus_one(pairs),
    ]
    return "\n".join(lines)


def wait_target(runs: list[dict]) -> str:
    """The issue's target, judged on the timed steps of the runs with background loader workers
    (each trainer's best worker count; the worst trainer counts)."""
    background = [r for r in runs if r["workers"] > 0]
    if not background:
        return "Target (issue): loader wait under 5% of step time: not measured (no run with loader workers)."
    best = {}
    for r in background:
        if r["trainer"] not in best or r["wait_frac"] < best[r["trainer"]]["wait_frac"]:
            best[r["trainer"]] = r
    worst = max(best.values(), key=lambda r: r["wait_frac"])
    verdict = "met" if worst["wait_frac"] < WAIT_TARGET else "not met"
    each = "; ".join(f"{t}: {100 * r['wait_frac']:.1f}% with {r['workers']} workers" for t, r in best.items())
    return (
        f"Target (issue): loader wait under {WAIT_TARGET:.0%} of step time: {verdict} ({each}; timed "
        "steps). tokens/s and images/s: per step over the median step time."
    )


def fsdp_versus_one(pairs: list[dict]) -> list[str]:
    """FSDP2 at one rank against one process: paired ratios per round and the verdict's rule."""
    if not pairs:
        return []
    verdicts = "; ".join(
        f"{p['workers']} workers: {'holds' if p['holds'] else 'does not hold'} "
        f"(median {100 * (p['median'] - 1):+.1f}%, noise ±{100 * p['noise']:.1f}%)"
        for p in pairs
    )
    return [
        "FSDP2 at one rank against one process (target of issue 21: no slower). Each round gives one "
        "paired ratio, the FSDP2 block's median step time over the one-process block's of the same "
        "round (adjacent in time, so drift cancels); noise = half the interquartile range of the "
        'rounds\' ratios. Rule: "no slower" holds when the median ratio <= 1 + noise.',
        "",
        *md_table(PAIR_COLS, [pair_cells(p) for p in pairs], left=PAIR_COLS[1:2]),
        "",
        f"No slower: {verdicts}.",
        "",
    ]


# --------------------------------------------------------------------------- main


@app.command()
def main(
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto")] = "auto",
    config: Annotated[
        str, typer.Option(help="tiny (tiny random Qwen2-VL) or qwen2-vl-2b (random weights)")
    ] = "tiny",
    dtype: Annotated[
        str,
        typer.Option(help="weights: float32 (master weights, as mmstore-trainer loads them) or bfloat16"),
    ] = "float32",
    samples: Annotated[int, typer.Option(min=1)] = 64,
    images_per_sample: Annotated[int, typer.Option(min=1)] = 2,
    width: Annotated[int, typer.Option(min=1)] = 640,
    height: Annotated[int, typer.Option(min=1)] = 480,
    workers: Annotated[str, typer.Option(help="comma-separated loader worker counts")] = "0,2,4",
    steps: Annotated[int, typer.Option(min=1, help="timed steps per block, after 1 untimed step")] = 4,
    rounds: Annotated[
        int, typer.Option(min=1, help="blocks per trainer and worker count; trainers alternate AB BA")
    ] = 2,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    token_budget: Annotated[int, typer.Option(min=1)] = 8192,
    gradient_checkpointing: Annotated[
        bool | None, typer.Option(help="recompute activations (default: on for qwen2-vl-2b, off for tiny)")
    ] = None,
    output: OutputOption = RESULTS,
    repeats: Annotated[int, typer.Option(min=1, help="loader passes per setting (median)")] = 3,
    write: Annotated[bool, typer.Option(help="rewrite the section in the results file")] = True,
    parallelism: Annotated[
        str, typer.Option(help="comma-separated trainers: off (one process), fsdp (FSDP2, one rank)")
    ] = "off",
    profile: Annotated[
        Path | None,
        typer.Option(
            help="instead of the timed rounds: one block of --steps steps per trainer under "
            "torch.profiler, its operators by self device time and by CPU time written to this file"
        ),
    ] = None,
) -> None:
    import torch
    from mmstore_client.layouts import from_pretrained as layout_from_pretrained
    from mmstore_client.samples import write_samples
    from mmstore_trainer.distributed import Ranks
    from transformers import AutoProcessor

    if config not in ("tiny", "qwen2-vl-2b"):
        raise typer.BadParameter(f"--config must be tiny or qwen2-vl-2b, got {config!r}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if gradient_checkpointing is None:  # a 2B step of 8 samples x 2 images needs ~75 GB without it
        gradient_checkpointing = config == "qwen2-vl-2b"
    counts = [int(w) for w in workers.split(",")]
    modes = parallelism.split(",")
    if not set(modes) <= set(TRAINERS):
        raise typer.BadParameter(f"--parallelism: off and/or fsdp, got {parallelism!r}")
    modes = sorted(set(modes), key=list(TRAINERS).index)  # fsdp last: it shards the model in place
    load_before = loadavg()
    with (
        tempfile.TemporaryDirectory(prefix="trainer-bench-") as tmp_name,
        store_process(Path(tmp_name)) as url,
    ):
        tmp = Path(tmp_name)
        model_dir = bench_model(config)
        processor = AutoProcessor.from_pretrained(str(model_dir))
        max_pixels = layout_from_pretrained(model_dir).config.max_pixels
        t0 = time.perf_counter()
        data, nbytes = make_samples(url, model_dir, samples, images_per_sample, width, height)
        typer.echo(f"uploaded and rendered {samples} samples in {time.perf_counter() - t0:.1f}s")
        samples_path = tmp / "samples.jsonl"
        write_samples(samples_path, data)

        loader_pass(data, url, model_dir, processor, max(counts))  # warm-up (page cache, imports)
        loads = []
        for w in counts:  # the median of `repeats` passes: a shared machine is noisy
            passes = sorted(
                (loader_pass(data, url, model_dir, processor, w) for _ in range(repeats)),
                key=lambda r: r["images_per_s"],
            )
            loads.append(passes[len(passes) // 2])
            spread = ", ".join(f"{r['images_per_s']:.0f}" for r in passes)
            loads[-1]["spread"] = spread
            typer.echo(f"loader workers={w}: {loads[-1]['images_per_s']:.1f} images/s (passes: {spread})")

        models = {}  # one per trainer: FSDP2 shards its copy in place, so the modes alternate unrebuilt
        for mode in modes:
            t0 = time.perf_counter()
            models[mode] = build_model(model_dir, device, dtype)
            n_params = sum(p.numel() for p in models[mode].parameters())
            typer.echo(
                f"model for {TRAINERS[mode]}: {n_params / 1e6:.1f} M parameters, {dtype}, "
                f"built in {time.perf_counter() - t0:.1f}s"
            )
        opts = {"steps": 1 + steps, "batch_size": batch_size, "token_budget": token_budget}
        opts["gradient_checkpointing"] = gradient_checkpointing
        warm = {**opts, "steps": 2}  # untimed: kernels, allocator and autotuning warm up
        group = Ranks.join(device, 600.0) if "fsdp" in modes else None  # a world of one rank, for every block
        args = (samples_path, url, model_dir)
        for mode in modes:
            training_block(*args, models[mode], processor, max(counts), warm, tmp / f"warm-{mode}", mode)
        if profile is not None:
            profile_blocks(
                profile,
                modes,
                lambda mode: training_block(
                    *args, models[mode], processor, max(counts), opts, tmp / f"profile-{mode}", mode
                ),
            )
            if group is not None:
                group.leave()
            return
        blocks = []
        for w in counts:
            for r in range(rounds):
                for mode in abba(modes, r):
                    out = tmp / f"run-w{w}-r{r}-{mode}"
                    metrics = training_block(*args, models[mode], processor, w, opts, out, mode)
                    timed = metrics[1:]
                    median = float(np.median([m.step_s for m in timed]))
                    blocks.append(
                        {
                            "mode": mode,
                            "workers": w,
                            "round": r,
                            "first": metrics[0],
                            "timed": timed,
                            "median_s": median,
                        }
                    )
                    wait = sum(m.wait_s for m in timed) / sum(m.step_s for m in timed)
                    typer.echo(
                        f"train {TRAINERS[mode]} workers={w} round {r + 1}/{rounds}: "
                        f"median step {median:.3f}s, wait {100 * wait:.1f}%"
                    )
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
        if group is not None:
            group.leave()
        runs = [mode_summary(blocks, mode, w) for mode in modes for w in counts]
        pairs = [p for w in counts if (p := paired(blocks, w))] if len(modes) == 2 else []

    autocast = " under bf16 autocast" if device.startswith("cuda") else ""
    info = {
        "command": "`" + " ".join(["python bench/trainer_bench.py", *sys.argv[1:]]) + "`",
        "model": f"{'tiny random Qwen2-VL' if config == 'tiny' else 'Qwen2-VL-2B-sized, random weights'} "
        f"({n_params / 1e6:.1f} M parameters, image processor max_pixels {max_pixels})",
        "device": device,
        "machine": machine(device),
        "load": f"{load_before} / {loadavg()}",
        "repeats": repeats,
        "date": utc_now(),
        "samples": samples,
        "per_sample": images_per_sample,
        "width": width,
        "height": height,
        "image_kb": nbytes / (samples * images_per_sample) / 1e3,
        "steps": steps,
        "rounds": rounds,
        "order": " ".join("".join(m[0].upper() for m in abba(modes, r)) for r in range(rounds))
        + " (O = one process, F = FSDP2)",
        "batch_size": batch_size,
        "token_budget": token_budget,
        "precision": f"{dtype} weights{autocast}"
        + (", gradient checkpointing" if gradient_checkpointing else ""),
    }
    section = markdown(loads, runs, pairs, info)
    typer.echo(section)
    if write:
        # one section per kind of device, so a CPU run never replaces the GPU figures
        write_section(output, "trainer_bench" if device.startswith("cuda") else "trainer_bench_cpu", section)
        typer.echo(f"wrote {output}")


if __name__ == "__main__":
    app()
