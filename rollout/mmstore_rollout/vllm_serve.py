"""The rollout loop's engine when it is stock vLLM with the ``mmstore-vllm`` plugin.

:class:`VllmServeInference` answers the worker's ``generate`` exactly like the inference
service's client, but talks to stock vLLM's token-in endpoint ``POST /inference/v1/generate``
(``--enable-scale-out``): the renderer's ids go out with each image run collapsed to one pad and
the images as ``content_parts`` refs (the plugin resolves them); vLLM's expanded prompt and
placeholder ranges come back and are checked against the descriptors token for token
(:func:`mmstore_client.stock_vllm.check_placeholders`) before the worker sees them.

Stock vLLM reports no digest of the pixels it decoded. The plugin decodes with the project's one
rule (``decode.decode_rgb`` of the verified bytes, its own tests compare them), so the pixel
digests handed to the trainer are that rule's, computed here once per digest from the bytes the
worker uploaded.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
from mmstore_client import AsyncStoreClient, decode
from mmstore_client.errors import ServerError, TransportError, error_from_response
from mmstore_client.inference import Completion, GenerateRequest, GenerateResponse, Timings, Usage
from mmstore_client.placeholders import check_runs, collapse, image_markup_ids
from mmstore_client.render import Renderer
from mmstore_client.stock_vllm import check_placeholders, content_parts

GENERATE_PATH = "/inference/v1/generate"


class VllmServeInference:
    """``generate(request)`` through stock vLLM + the plugin; the worker's inference client."""

    def __init__(
        self,
        url: str,
        renderer: Renderer,
        store: AsyncStoreClient,
        *,
        timeout: float = 300.0,
        retries: int = 2,
    ) -> None:
        self.url = url.rstrip("/")
        self.renderer = renderer
        self.store = store
        self.retries = retries
        self.retried = 0
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout)
        markup = image_markup_ids(renderer.tokenizer, renderer.layout)
        self._plain = sorted(set(renderer.tokenizer.get_vocab().values()) - markup)
        self._pixels: dict[str, str] = {}

    async def __aenter__(self) -> VllmServeInference:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    def _body(self, request: GenerateRequest) -> dict:
        s = request.sampling
        runs = check_runs(request.prompt_token_ids, request.descriptors, self.renderer.image_token_id)
        sampling = {
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k or -1,
            "n": s.n,
            "logprobs": 0 if s.logprobs else None,
            "stop_token_ids": s.stop_token_ids,
            **({"seed": s.seed} if s.seed is not None else {}),
            **({} if s.allow_image_tokens else {"allowed_token_ids": self._plain}),
        }
        return {
            "request_id": request.request_id or uuid.uuid4().hex,
            "token_ids": collapse(request.prompt_token_ids, runs),
            "content_parts": content_parts(request.descriptors),
            "sampling_params": sampling,
            "return_token_ids": True,
        }

    async def _pixel_digest(self, digest: str) -> str:
        if digest not in self._pixels:
            data = await self.store.get(digest)
            self._pixels[digest] = await asyncio.to_thread(
                lambda: decode.pixel_digest(decode.decode_rgb(data))
            )
        return self._pixels[digest]

    async def _post(self, body: dict) -> dict:
        for attempt in range(self.retries + 1):
            try:
                response = await self._http.post(GENERATE_PATH, json=body)
                if response.status_code >= 400:
                    raise error_from_response(response)
                return response.json()
            except (httpx.TransportError, ServerError) as exc:
                if (isinstance(exc, ServerError) and exc.status != 503) or attempt == self.retries:
                    if isinstance(exc, httpx.TransportError):
                        raise TransportError(f"POST {self.url}{GENERATE_PATH}: {exc!r}") from exc
                    raise
                self.retried += 1
                await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    async def generate(self, request: GenerateRequest, *, affinity: str | None = None) -> GenerateResponse:
        """``affinity`` is accepted for the worker's sake; one stock server needs none."""
        t0 = time.perf_counter()
        answer = await self._post(self._body(request))
        total = time.perf_counter() - t0
        prompt = answer["prompt_token_ids"]
        placeholders = (answer.get("mm_placeholders") or {}).get("image", [])
        check_placeholders(prompt, placeholders, request.descriptors, self.renderer.image_token_id)
        samples = [
            Completion(
                token_ids=c["token_ids"],
                logprobs=[x["logprob"] for x in (c.get("logprobs") or {}).get("content") or []] or None,
                finish_reason=c.get("finish_reason") or "stop",
            )
            for c in answer["choices"]
        ]
        pixels = [await self._pixel_digest(d.digest) for d in request.descriptors]
        return GenerateResponse(
            request_id=str(answer.get("request_id", "")),
            prompt_token_ids=prompt,
            pixel_digests=pixels,
            samples=samples,
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=sum(len(c.token_ids) for c in samples)),
            # stock vLLM reports no phase timings: the request's wall time is all there is
            timings=Timings(fetch_s=0.0, process_s=0.0, generate_s=total, total_s=total),
        )
