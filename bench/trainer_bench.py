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
2. Loader wait during training: ``--steps`` training steps (batch ``--batch-size``) per worker
   setting; the fraction of step wall time the step spent blocked on the loader (all steps, and
   steps 2.. which excludes filling the pipeline).
3. With ``--parallelism off,fsdp``, step 2 again with the trainer as one FSDP2 rank (the code path
   of ``torchrun --nproc-per-node N``, here a world of one: sharding, collectives and the full
   state dict machinery, no second GPU), against the single-process trainer on the same model,
   data and workers. On the lent H200, one command::

       python bench/trainer_bench.py --device cuda --config qwen2-vl-2b --parallelism off,fsdp --workers 0,2

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
from collections.abc import Iterator
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


def training_run(
    samples_path: Path,
    url: str,
    model_dir: Path,
    model: Any,
    processor: Any,
    workers: int,
    opts: dict,
    tmp: Path,
    parallelism: str = "off",
) -> dict[str, float]:
    """``steps`` training steps with the loader at ``workers``; the step's wait on the loader.
    ``parallelism`` ``fsdp``: the trainer shards ``model`` (once; later runs reuse it) as rank 0
    of the process group the caller made."""
    from mmstore_client import StoreClient
    from mmstore_trainer import TrainConfig, Trainer

    config = TrainConfig(
        model=model_dir,
        data=[samples_path],
        out=tmp / f"run-{parallelism}-w{workers}",
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
    m = report.metrics
    steady = m[1:] or m
    return {
        "trainer": TRAINERS[parallelism],
        "workers": workers,
        "steps": len(m),
        "step_s": sum(x.step_s for x in m) / len(m),
        "steady_step_s": sum(x.step_s for x in steady) / len(steady),
        "wait_frac": sum(x.wait_s for x in m) / sum(x.step_s for x in m),
        "steady_wait_frac": sum(x.wait_s for x in steady) / sum(x.step_s for x in steady),
        "tokens_per_step": sum(x.tokens for x in m) / len(m),
        "images_per_step": sum(x.images for x in m) / len(m),
        "micro_batches": sum(x.micro_batches for x in m) / len(m),
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
    "step s",
    "step s (2..)",
    "wait (all)",
    "wait (2..)",
    "tokens/step",
    "images/step",
    "tokens/s (2..)",
    "images/s (2..)",
    "micro-batches",
]
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
        f"{r['step_s']:.3f}",
        f"{r['steady_step_s']:.3f}",
        f"{100 * r['wait_frac']:.0f}%",
        f"{100 * r['steady_wait_frac']:.0f}%",
        f"{r['tokens_per_step']:.0f}",
        f"{r['images_per_step']:.0f}",
        f"{r['tokens_per_step'] / r['steady_step_s']:,.0f}",
        f"{r['images_per_step'] / r['steady_step_s']:.1f}",
        f"{r['micro_batches']:.1f}",
    ]


def markdown(loads: list[dict], runs: list[dict], info: dict[str, Any]) -> str:
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
        f"{info['steps']} training steps of {info['batch_size']} samples (token budget "
        f"{info['token_budget']}, {info['precision']}); wait = time the step spent blocked on the loader, "
        "as a fraction of step wall time (all steps; and steps 2.., excluding the first fill of the "
        "pipeline). One untimed 2-step run first warms up kernels and the allocator.",
        "",
        *md_table(RUN_COLS, [run_cells(r) for r in runs], left=RUN_COLS[:1]),
        "",
        wait_target(runs),
        "",
        *fsdp_versus_one(runs),
    ]
    return "\n".join(lines)


def wait_target(runs: list[dict]) -> str:
    """The issue's target, judged on the runs with background loader workers."""
    background = [r for r in runs if r["workers"] > 0]
    if not background:
        return "Target (issue): loader wait under 5% of step time: not measured (no run with loader workers)."
    best = min(background, key=lambda r: r["steady_wait_frac"])
    verdict = "met" if best["steady_wait_frac"] < WAIT_TARGET else "not met"
    return (
        f"Target (issue): loader wait under {WAIT_TARGET:.0%} of step time: {verdict} "
        f"({100 * best['steady_wait_frac']:.0f}% in steps 2.., {100 * best['wait_frac']:.0f}% over all "
        f"steps, with {best['workers']} loader workers). tokens/s and images/s: per step over the step "
        "time of steps 2.."
    )


def fsdp_versus_one(runs: list[dict]) -> list[str]:
    """FSDP2 at one rank against one process, at each worker count measured both ways."""
    one = {r["workers"]: r for r in runs if r["trainer"] == TRAINERS["off"]}
    pairs = [(one[r["workers"]], r) for r in runs if r["trainer"] == TRAINERS["fsdp"] and r["workers"] in one]
    if not pairs:
        return []
    ratios = ", ".join(
        f"{100 * (f['steady_step_s'] / o['steady_step_s'] - 1):+.0f}% with {o['workers']} workers"
        for o, f in pairs
    )
    return [
        f"FSDP2 at one rank against one process, step time of steps 2..: {ratios} "
        "(target of issue 21: no slower; wait < 5%).",
        "",
    ]


# --------------------------------------------------------------------------- main


@app.command()
def main(
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto")] = "auto",
    config: Annotated[
        str, typer.Option(help="tiny (tiny random Qwen2-VL) or qwen2-vl-2b (random weights)")
    ] = "tiny",
    dtype: Annotated[str, typer.Option(help="weights: float32 or bfloat16 (default: bf16 for 2B)")] = "",
    samples: Annotated[int, typer.Option(min=1)] = 64,
    images_per_sample: Annotated[int, typer.Option(min=1)] = 2,
    width: Annotated[int, typer.Option(min=1)] = 640,
    height: Annotated[int, typer.Option(min=1)] = 480,
    workers: Annotated[str, typer.Option(help="comma-separated loader worker counts")] = "0,2,4",
    steps: Annotated[int, typer.Option(min=2)] = 8,
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
) -> None:
    import torch
    from mmstore_client.layouts import from_pretrained as layout_from_pretrained
    from mmstore_client.samples import write_samples
    from mmstore_trainer.distributed import Ranks
    from transformers import AutoProcessor

    if config not in ("tiny", "qwen2-vl-2b"):
        raise typer.BadParameter(f"--config must be tiny or qwen2-vl-2b, got {config!r}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtype = dtype or ("bfloat16" if config == "qwen2-vl-2b" else "float32")
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

        t0 = time.perf_counter()
        model = build_model(model_dir, device, dtype)
        n_params = sum(p.numel() for p in model.parameters())
        typer.echo(
            f"model: {n_params / 1e6:.1f} M parameters, {dtype}, built in {time.perf_counter() - t0:.1f}s"
        )
        opts = {"steps": steps, "batch_size": batch_size, "token_budget": token_budget}
        opts["gradient_checkpointing"] = gradient_checkpointing
        warm = {**opts, "steps": 2}  # untimed: kernels, allocator and autotuning warm up
        runs = []
        for mode in modes:
            group = Ranks.join(device, 600.0) if mode == "fsdp" else None  # a world of one rank
            args = (samples_path, url, model_dir, model, processor)
            training_run(*args, max(counts), warm, tmp, mode)
            for w in counts:
                runs.append(training_run(*args, w, opts, tmp, mode))
                typer.echo(
                    f"train {TRAINERS[mode]} workers={w}: step {runs[-1]['step_s']:.3f}s, "
                    f"wait {100 * runs[-1]['wait_frac']:.0f}%"
                )
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            if group is not None:
                group.leave()

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
        "batch_size": batch_size,
        "token_budget": token_budget,
        "precision": f"{dtype} weights{autocast}"
        + (", gradient checkpointing" if gradient_checkpointing else ""),
    }
    section = markdown(loads, runs, info)
    typer.echo(section)
    if write:
        # one section per kind of device, so a CPU run never replaces the GPU figures
        write_section(output, "trainer_bench" if device.startswith("cuda") else "trainer_bench_cpu", section)
        typer.echo(f"wrote {output}")


if __name__ == "__main__":
    app()
