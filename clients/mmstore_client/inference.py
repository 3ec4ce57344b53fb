"""The inference service's wire schemas and its clients (:class:`InferenceClient`, async twin).

``POST /v1/generate`` takes the renderer's output as is: prompt token ids with every image's
placeholder run expanded, and the descriptors of the images in order. The service pulls each
image by digest, verifies it, checks the ids against vLLM's own expansion, and samples.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from .descriptor import Descriptor, _Strict
from .errors import ServerError, TransportError, error_from_response

FinishReason = Literal["stop", "length", "abort"]

# Routing hint for a load balancer in front of several replicas (nginx hashes it consistently):
# the rollout group's id, so every turn and every sample of a group reaches the replica whose
# caches hold its images and prefix. Never needed for correctness: any replica serves any request.
AFFINITY_HEADER = "X-Mmstore-Affinity"


class SamplingOptions(_Strict):
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: off")
    seed: int | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    n: int = Field(1, ge=1, le=64, description="samples of this prompt")
    logprobs: bool = Field(True, description="return the logprob of each sampled token")
    allow_image_tokens: bool = Field(
        False, description="let the policy sample image special tokens (forbidden by default)"
    )
    structural_tag: dict[str, Any] | None = Field(
        None,
        description="an xgrammar structural tag every completion must match (vLLM's structured "
        "outputs), e.g. mmstore_client.chat_formats' tool_call_constraint; its JSON-schema contents "
        "are written as chat templates' tojson writes JSON (', ' and ': ', no other whitespace)",
    )


class GenerateRequest(_Strict):
    prompt_token_ids: list[int] = Field(min_length=1)
    descriptors: list[Descriptor] = Field(default_factory=list)
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)
    request_id: str | None = Field(None, max_length=200, description="for logs; generated if absent")


class Completion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: FinishReason


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int | None = None


class Timings(BaseModel):
    fetch_s: float = Field(description="fetching, verifying and decoding the images")
    process_s: float = Field(description="vLLM's input processing and the placeholder check")
    vllm_process_s: float | None = Field(
        None,
        description="of process_s, the time in vLLM's own input processing (its processor-cache lookups "
        "and placeholder expansion); None where the server does not say",
    )
    generate_s: float = Field(description="from submission to the last token (queue included)")
    total_s: float


class GenerateResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    prompt_token_ids: list[int] = Field(description="the prompt vLLM ran: equal to the request's")
    pixel_digests: list[str] = Field(
        default_factory=list, description="per image, decode.pixel_digest of the pixels handed to vLLM"
    )
    samples: list[Completion]
    usage: Usage
    timings: Timings


class _InferenceBase:
    def __init__(self, url: str, *, timeout: float = 300.0, retries: int = 2, backoff: float = 0.5) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.retried = 0  # requests re-sent after a transport error or a 503

    @staticmethod
    def _body(request: GenerateRequest | dict[str, Any]) -> bytes:
        """The request as JSON, written by pydantic's core (json.dumps of a dumped dict takes
        ~3 ms for the 30 k ids of a long conversation, this ~0.5 ms)."""
        if not isinstance(request, GenerateRequest):
            request = GenerateRequest.model_validate(request)
        return request.model_dump_json(exclude_none=True).encode()

    @staticmethod
    def _headers(affinity: str | None) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if affinity:
            headers[AFFINITY_HEADER] = affinity
        return headers

    @staticmethod
    def _parse(response: httpx.Response) -> GenerateResponse:
        if response.status_code >= 400:
            raise error_from_response(response)
        return GenerateResponse.model_validate_json(response.content)

    @staticmethod
    def _retryable(exc: Exception) -> bool:
        # generation requests are idempotent (same ids, same refs): safe to re-send on 503/transport
        return isinstance(exc, httpx.TransportError) or (isinstance(exc, ServerError) and exc.status == 503)


class InferenceClient(_InferenceBase):
    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._http = httpx.Client(base_url=self.url, timeout=self.timeout)

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def generate(
        self, request: GenerateRequest | dict[str, Any], *, affinity: str | None = None
    ) -> GenerateResponse:
        """``affinity``: sent as ``X-Mmstore-Affinity`` (same key, same replica behind nginx)."""
        body, headers = self._body(request), self._headers(affinity)
        for attempt in range(self.retries + 1):
            try:
                return self._parse(self._http.post("/v1/generate", content=body, headers=headers))
            except Exception as exc:
                if not self._retryable(exc) or attempt == self.retries:
                    if isinstance(exc, httpx.TransportError):
                        raise TransportError(f"POST {self.url}/v1/generate: {exc!r}") from exc
                    raise
                self.retried += 1
                time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")


class AsyncInferenceClient(_InferenceBase):
    def __init__(self, url: str, *, transport: httpx.AsyncBaseTransport | None = None, **kwargs: Any) -> None:
        """``transport``: httpx's own by default; :class:`~mmstore_client.transport.AiohttpTransport`
        takes ~0.3 ms less a request of a few thousand ids each way."""
        super().__init__(url, **kwargs)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=self.timeout, transport=transport)

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def generate(
        self, request: GenerateRequest | dict[str, Any], *, affinity: str | None = None
    ) -> GenerateResponse:
        """``affinity``: sent as ``X-Mmstore-Affinity`` (same key, same replica behind nginx)."""
        body, headers = self._body(request), self._headers(affinity)
        for attempt in range(self.retries + 1):
            try:
                return self._parse(await self._http.post("/v1/generate", content=body, headers=headers))
            except Exception as exc:
                if not self._retryable(exc) or attempt == self.retries:
                    if isinstance(exc, httpx.TransportError):
                        raise TransportError(f"POST {self.url}/v1/generate: {exc!r}") from exc
                    raise
                self.retried += 1
                await asyncio.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")
