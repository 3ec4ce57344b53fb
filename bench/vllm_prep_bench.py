"""vLLM's own prompt processing of a long conversation's images, by turn, when every image is cached.

Run: ``.venv/bin/python bench/vllm_prep_bench.py`` (about a minute; no engine, no GPU needed).
The service hands vLLM the decoded images with their digests as ``multi_modal_uuids``
(:meth:`mmstore_inference.engine.Engine.prepare`); vLLM's renderer looks each image up in its
processor cache and expands the placeholders. This bench times two ways of that call on vLLM's own
renderer (``renderer.render_cmpl``, built from the engine arguments the service uses), on the
prompts of the OpenAI bench's 20-turn conversation (2 images a turn, a 1280x720 screenshot PNG and
a 640x480 photo JPEG, the same texts), after every turn has been processed once, so only cache
hits are measured:

- *whole prompt*: the compact prompt (one placeholder per image) with its images, as any client of
  vLLM hands it a prompt;
- *images alone + splice*: what the service does: the images alone (one placeholder each, no text
  between them), then each image's expansion put in place of its placeholder
  (:func:`mmstore_inference.engine._splice`).

The difference is what vLLM's search for the placeholders costs in the text between them, and how
it grows with the conversation for the installed vLLM version (quadratic in 0.26).

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
    from mmstore_client.render import Renderer
    from mmstore_inference.engine import _decoded, _splice, engine_args
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
    client_renderer = Renderer.from_pretrained(model)
    image_token = client_renderer.tokenizer.convert_tokens_to_ids(client_renderer.layout.image_token)
    digests = [compute_digest(b) for b in files]
    images = [_decoded(decode_rgb(b), d) for b, d in zip(files, digests, strict=True)]

    def render(ids: list[int], k: int):
        prompt = TokensPrompt(prompt_token_ids=ids)
        prompt["multi_modal_data"] = {"image": images[:k]}
        prompt["multi_modal_uuids"] = {"image": digests[:k]}
        (engine_input,) = renderer.render_cmpl([parse_model_prompt(config.model_config, prompt)])
        return engine_input

    def whole(turn: int) -> float:
        started = time.perf_counter()
        render(prompts[turn], 2 * (turn + 1))
        return time.perf_counter() - started

    def spliced(turn: int) -> float:
        k = 2 * (turn + 1)
        started = time.perf_counter()
        engine_input = _splice(prompts[turn], image_token, render([image_token] * k, k))
        took = time.perf_counter() - started
        if engine_input is None:
            raise RuntimeError("the images alone did not splice into the prompt")
        return took

    for turn in range(turns):  # every image into vLLM's processor cache
        whole(turn)
    times: dict[str, list[list[float]]] = {way: [[] for _ in range(turns)] for way in ("whole", "spliced")}
    for _ in range(repeats):  # rounds over all turns: a busy moment spreads over every turn
        for turn in range(turns):
            times["whole"][turn].append(whole(turn) * 1e3)
            times["spliced"][turn].append(spliced(turn) * 1e3)
    rows = [
        {
            "turn": t + 1,
            "images": 2 * (t + 1),
            "ids": len(prompts[t]),
            "ms": statistics.median(times["whole"][t]),
            "spliced_ms": statistics.median(times["spliced"][t]),
        }
        for t in range(turns)
    ]
    renderer.shutdown()
    return rows, vllm.__version__


def cells(rows: list[dict]) -> list[list[str]]:
    return [
        [
            str(r["turn"]),
            str(r["images"]),
            str(r["ids"]),
            f"{r['ms']:.2f}",
            f"{r['ms'] / r['images']:.3f}",
            f"{r['spliced_ms']:.2f}",
            f"{r['spliced_ms'] / r['images']:.3f}",
        ]
        for r in rows
    ]


COLS = (
    "turn",
    "images",
    "compact ids",
    "whole prompt ms",
    "per image ms",
    "images alone + splice ms",
    "per image ms",
)


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
        " each turn's prompt of the OpenAI bench's 20-turn conversation, every image already in"
        " vLLM's processor cache (digests as `multi_modal_uuids`, images as `MediaWithBytes`), two"
        " ways: *whole prompt*, the compact prompt (one placeholder per image) as any client of vLLM"
        " hands it; *images alone + splice*, what the service does (`Engine.prepare`): the images"
        " alone, one placeholder each, then each image's expansion put in place of its placeholder"
        " (`engine._splice`; the same engine input, checked by `tests/test_engine_prepare.py`). The"
        " part of the service's `process` time, and of the OpenAI bench's \"vLLM prep\", that is"
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
        f"- whole prompt, turn 1 -> 5 -> {last['turn']}: {first['ms']:.2f} -> {fifth['ms']:.2f} ->"
        f" {last['ms']:.2f} ms; turn {last['turn']} / turn 5: {growth:.2f}x for"
        f" {last['images'] / fifth['images']:.0f}x the images.",
        f"- images alone + splice, turn 1 -> 5 -> {last['turn']}: {first['spliced_ms']:.2f} ->"
        f" {fifth['spliced_ms']:.2f} -> {last['spliced_ms']:.2f} ms; turn {last['turn']} / turn 5:"
        f" {last['spliced_ms'] / fifth['spliced_ms']:.2f}x.",
        f"- Command: `{env_prefix()}python bench/vllm_prep_bench.py --turns {turns} --repeats {repeats}`",
    ]
    if write:
        write_section(output, "vllm_prep_bench_gpu" if gpu else "vllm_prep_bench", "\n".join(lines) + "\n")


if __name__ == "__main__":
    app()
