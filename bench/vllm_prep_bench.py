"""vLLM's own prompt processing of a long conversation's images, by turn, when every image is cached.

Run: ``.venv/bin/python bench/vllm_prep_bench.py`` (about a minute; no engine, no GPU needed).
The service hands vLLM one placeholder per image and the decoded images with their digests as
``multi_modal_uuids`` (:meth:`mmstore_inference.engine.Engine.prepare`); vLLM's renderer then
looks each image up in its processor cache and expands the placeholders. This bench times exactly
that call (``renderer.render_cmpl`` on vLLM's own renderer, built from the engine arguments the
service uses) on the prompts of the OpenAI bench's 20-turn conversation (2 images a turn, a
1280x720 screenshot PNG and a 640x480 photo JPEG, the same texts), after every turn has been
processed once, so only cache hits are measured: the part of the service's ``process`` time (the
OpenAI bench's "engine prep") that belongs to vLLM and that no client of vLLM can avoid, and how
it grows with the conversation for the installed vLLM version.

Writes the ``vllm_prep_bench`` section of ``bench/RESULTS.md`` (``vllm_prep_bench_gpu`` on a GPU
machine), one table per vLLM version.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Annotated

import typer
from benchlib import (
    RESULTS,
    add_to_path,
    bench_model,
    console,
    env_prefix,
    loadavg,
    machine,
    make_app,
    md_table,
    model_text,
    rich_table,
    utc_now,
    write_section,
)

add_to_path("bench")
app = make_app(__doc__)


def conversation_prompts(model: Path, turns: int) -> tuple[list[list[int]], list[bytes]]:
    """Each turn's compact ids (one placeholder per image) and the conversation's image files."""
    from mmstore_client import decode
    from mmstore_client.digest import compute_digest, make_ref
    from mmstore_client.placeholders import collapse
    from mmstore_client.render import Renderer
    from openai_bench import Conversation, photo_jpeg, screenshot_png

    images = [[screenshot_png(2 * t), photo_jpeg(2 * t + 1)] for t in range(turns)]
    conv = Conversation("prep", 0, images)
    files = {compute_digest(b): b for pair in images for b in pair}
    headers = {d: decode.probe(b) for d, b in files.items()}
    renderer = Renderer.from_pretrained(model)
    prompts = []
    for turn in range(turns):
        rendered = renderer.render(conv.messages(turn, lambda b: make_ref(compute_digest(b))), headers)
        prompts.append(collapse(rendered.token_ids, rendered.image_spans))
    return prompts, [b for pair in images for b in pair]


def measure(model: Path, turns: int, repeats: int, max_model_len: int) -> tuple[list[dict], str]:
    import vllm
    from mmstore_client.decode import decode_rgb
    from mmstore_client.digest import compute_digest
    from mmstore_inference.engine import _decoded, engine_args
    from mmstore_inference.settings import InferenceSettings
    from mmstore_rollout.stack import on_gpu
    from vllm.inputs import TokensPrompt
    from vllm.renderers import renderer_from_config
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    prompts, files = conversation_prompts(model, turns)
    settings = InferenceSettings(
        model=model, max_model_len=max_model_len, max_images_per_prompt=2 * turns, enforce_eager=True
    )
    config = engine_args(settings, on_gpu()).create_engine_config()
    renderer = renderer_from_config(config)
    digests = [compute_digest(b) for b in files]
    images = [_decoded(decode_rgb(b), d) for b, d in zip(files, digests, strict=True)]

    def process(turn: int) -> float:
        k = 2 * (turn + 1)
        prompt = TokensPrompt(prompt_token_ids=prompts[turn])
        prompt["multi_modal_data"] = {"image": images[:k]}
        prompt["multi_modal_uuids"] = {"image": digests[:k]}
        started = time.perf_counter()
        renderer.render_cmpl([parse_model_prompt(config.model_config, prompt)])
        return time.perf_counter() - started

    for turn in range(turns):  # every image into vLLM's processor cache
        process(turn)
    times: list[list[float]] = [[] for _ in range(turns)]
    for _ in range(repeats):  # rounds over all turns: a busy moment spreads over every turn
        for turn in range(turns):
            times[turn].append(process(turn) * 1e3)
    rows = [
        {"turn": t + 1, "images": 2 * (t + 1), "ids": len(prompts[t]), "ms": statistics.median(times[t])}
        for t in range(turns)
    ]
    renderer.shutdown()
    return rows, vllm.__version__


def cells(rows: list[dict]) -> list[list[str]]:
    return [
        [str(r["turn"]), str(r["images"]), str(r["ids"]), f"{r['ms']:.2f}", f"{r['ms'] / r['images']:.3f}"]
        for r in rows
    ]


COLS = ("turn", "images", "compact ids", "vLLM prep ms", "per image ms")


@app.command()
def main(
    turns: Annotated[int, typer.Option(min=2, help="turns of the conversation (2 images each)")] = 20,
    repeats: Annotated[int, typer.Option(min=1, help="timings per turn (median)")] = 9,
    max_model_len: Annotated[int, typer.Option(help="as the service's MAX_MODEL_LEN")] = 40960,
    output: Annotated[Path, typer.Option(help="results file (section between the markers)")] = RESULTS,
    write: Annotated[bool, typer.Option(help="rewrite the section in the results file")] = True,
) -> None:
    import os

    # the 2B config says 32768 positions; M-RoPE gives an image far fewer positions than tokens
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    from openai_bench import machine_line

    model = bench_model()
    gpu = bool(machine()["gpu"])
    load_before = loadavg()
    rows, version = measure(model, turns, repeats, max_model_len)
    console.print(rich_table(f"vLLM {version}: prompt processing of cached images", COLS, cells(rows), ()))
    first, fifth, last = rows[0], rows[min(4, len(rows) - 1)], rows[-1]
    growth = last["ms"] / fifth["ms"]
    lines = [
        "## vLLM's prompt processing of cached images" + (" (GPU machine)" if gpu else ""),
        "",
        "`renderer.render_cmpl` of vLLM's own renderer (built from the service's engine arguments) on"
        " each turn's compact prompt of the OpenAI bench's 20-turn conversation, every image already"
        " in vLLM's processor cache (digests as `multi_modal_uuids`, images as `MediaWithBytes`): the"
        " part of the service's `process` time, and of the OpenAI bench's \"engine prep\", that is"
        " vLLM's own. One run of `bench/vllm_prep_bench.py`; median per turn of"
        f" {repeats} rounds over all turns.",
        "",
        f"Machine: {machine_line()}. Date: {utc_now()}. Load average before/after: {load_before} /"
        f" {loadavg()}.",
        "",
        f"vLLM {version}, {model_text(model)}:",
        "",
        *md_table(COLS, cells(rows), left=()),
        "",
        f"- turn 1 -> 5 -> {last['turn']}: {first['ms']:.2f} -> {fifth['ms']:.2f} -> {last['ms']:.2f} ms;"
        f" turn {last['turn']} / turn 5: {growth:.2f}x for {last['images'] / fifth['images']:.0f}x the"
        " images.",
        f"- Command: `{env_prefix()}python bench/vllm_prep_bench.py --turns {turns} --repeats {repeats}`",
    ]
    if write:
        write_section(output, "vllm_prep_bench_gpu" if gpu else "vllm_prep_bench", "\n".join(lines) + "\n")


if __name__ == "__main__":
    app()
