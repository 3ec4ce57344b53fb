"""One generate request, checked end to end before vLLM samples anything.

Order of checks (each failure is a specific error; none reaches the engine):
1. every descriptor is of the loaded model's family and layout fingerprint, and its grid and
   token count are what the layout gives for its size (``layout_mismatch``);
2. the ids' image placeholder runs match the descriptors in count and length
   (``placeholder_mismatch``);
3. each image is fetched by digest, blake3-verified, decoded with the shared decoding rule and
   its size compared with the descriptor (``missing_asset``, ``corrupt_asset``,
   ``descriptor_mismatch``, ``store_unavailable``);
4. vLLM's renderer expands the one-placeholder-per-image prompt; its ids must equal the request's
   token for token (``placeholder_mismatch``). Only then is the request sampled.

It raises only the service's own errors (:mod:`.errors`): vLLM's refusal of a request
(:class:`~.engine.EngineRejected`) is ``invalid_request``/``engine_rejected``, and any other failure
while the engine is down is ``engine_unavailable``; anything else is a bug and propagates as one.
"""

from __future__ import annotations

import logging
import time
import uuid

from mmstore_client.descriptor import Descriptor
from mmstore_client.inference import GenerateRequest, GenerateResponse, Timings, Usage
from mmstore_client.layouts import Layout, LayoutRefusal
from mmstore_client.placeholders import PlaceholderMismatch as IdsMismatch
from mmstore_client.placeholders import check_runs, collapse, image_markup_ids

from .engine import Engine, EngineRejected
from .errors import EngineUnavailable, InvalidRequest, LayoutMismatch, PlaceholderMismatch
from .fetch import ImageFetcher
from .metrics import InferenceMetrics

log = logging.getLogger("mmstore_inference")


class GenerateService:
    def __init__(
        self, engine: Engine, layout: Layout, tokenizer, fetcher: ImageFetcher, metrics: InferenceMetrics
    ):
        self.engine = engine
        self.layout = layout
        self.fetcher = fetcher
        self.metrics = metrics
        self.image_token_id: int = tokenizer.convert_tokens_to_ids(layout.image_token)
        # every token of the family's image markup: never sampled unless a request allows it
        self.image_markup_ids = image_markup_ids(tokenizer, layout)

    def _check_layout(self, index: int, desc: Descriptor) -> None:
        if desc.family != self.layout.family or desc.fingerprint != self.layout.fingerprint:
            raise LayoutMismatch(
                f"image {index}: descriptor is for {desc.family}/{desc.fingerprint}, the loaded model "
                f"is {self.layout.family}/{self.layout.fingerprint}; re-render with this model's layout",
                image=index,
                expected=self.layout.fingerprint,
                actual=desc.fingerprint,
            )
        try:
            placement = self.layout.place(desc.width, desc.height)
        except LayoutRefusal as exc:
            raise LayoutMismatch(f"image {index}: {exc}", image=index) from None
        if (tuple(placement.grid), placement.num_tokens) != (tuple(desc.grid), desc.num_tokens):
            raise LayoutMismatch(
                f"image {index}: a {desc.width}x{desc.height} image has grid {list(placement.grid)} and "
                f"{placement.num_tokens} tokens, the descriptor says {list(desc.grid)} and {desc.num_tokens}",
                image=index,
                expected=placement.num_tokens,
                actual=desc.num_tokens,
            )

    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        if not self.engine.ready:
            raise EngineUnavailable("the vLLM engine is not ready")
        try:
            return await self._generate(req)
        except EngineRejected as exc:
            raise InvalidRequest(f"vLLM refused the request: {exc}", code="engine_rejected") from None
        except Exception as exc:
            if self.engine.ready:
                raise
            raise EngineUnavailable(f"the vLLM engine failed: {exc!r}") from None

    async def _generate(self, req: GenerateRequest) -> GenerateResponse:
        started = time.perf_counter()
        request_id = req.request_id or uuid.uuid4().hex
        ids = req.prompt_token_ids
        context = self.engine.settings.max_model_len
        if len(ids) >= context:  # vLLM's own refusal would come after it has processed the images
            raise InvalidRequest(
                f"the context is {context} tokens: the prompt's {len(ids)} leave none to sample",
                code="context_length_exceeded",
                param="prompt_token_ids",
            )
        for i, desc in enumerate(req.descriptors):
            self._check_layout(i, desc)
        try:
            runs = check_runs(ids, req.descriptors, self.image_token_id)
        except IdsMismatch as exc:
            raise PlaceholderMismatch(
                str(exc), image=exc.image, expected=exc.expected, actual=exc.actual
            ) from None

        t_fetch = time.perf_counter()
        images = await self.fetcher.images(req.descriptors)
        fetch_s = time.perf_counter() - t_fetch
        self.metrics.fetch_seconds.observe(fetch_s)

        # before vLLM renders: a prepared input must reach the engine or be discarded
        params = self.engine.sampling_params(req.sampling, self.image_markup_ids)
        t_process = time.perf_counter()
        digests = [d.digest for d in req.descriptors]
        prepared = await self.engine.prepare(collapse(ids, runs), images, digests, self.image_token_id)
        if prepared.expanded_ids != ids:
            self.engine.discard(prepared)
            lengths = prepared.placeholder_lengths
            for i, (got, desc) in enumerate(zip(lengths, req.descriptors, strict=False)):
                if got != desc.num_tokens:
                    raise PlaceholderMismatch(
                        f"image {i} ({desc.digest}): vLLM expands it to {got} tokens, the descriptor says "
                        f"{desc.num_tokens}",
                        image=i,
                        expected=desc.num_tokens,
                        actual=got,
                    )
            first = next(
                (k for k, (a, b) in enumerate(zip(prepared.expanded_ids, ids, strict=False)) if a != b),
                min(len(ids), len(prepared.expanded_ids)),
            )
            raise PlaceholderMismatch(
                f"vLLM's processed prompt differs from the request's ids at position {first} "
                f"({len(prepared.expanded_ids)} vs {len(ids)} tokens)",
                position=first,
                expected=len(ids),
                actual=len(prepared.expanded_ids),
            )
        process_s = time.perf_counter() - t_process

        t_gen = time.perf_counter()
        result = await self.engine.generate(prepared, params, request_id)
        generate_s = time.perf_counter() - t_gen
        self.metrics.generate_seconds.observe(generate_s)
        self.metrics.images.inc(len(digests))
        self.metrics.prompt_tokens.inc(len(ids))
        if result.cached_prompt_tokens:
            self.metrics.cached_prompt_tokens.inc(result.cached_prompt_tokens)
        total = time.perf_counter() - started
        log.info(
            "generate %s ok images=%s prompt=%d n=%d total=%.3fs",
            request_id,
            ",".join(digests) or "-",
            len(ids),
            req.sampling.n,
            total,
        )
        # built from the engine's output and checked ids: validating 30 k ids again costs ~1 ms
        return GenerateResponse.model_construct(
            request_id=request_id,
            prompt_token_ids=result.prompt_token_ids,
            pixel_digests=[self.fetcher.pixel_digest(d, img) for d, img in zip(digests, images, strict=True)],
            samples=result.completions,
            usage=Usage(
                prompt_tokens=len(ids),
                completion_tokens=sum(len(c.token_ids) for c in result.completions),
                cached_prompt_tokens=result.cached_prompt_tokens,
            ),
            timings=Timings(
                fetch_s=fetch_s,
                process_s=process_s,
                vllm_process_s=prepared.vllm_s,
                generate_s=generate_s,
                total_s=total,
            ),
        )
