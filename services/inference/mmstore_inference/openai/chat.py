"""OpenAI-compatible chat on the inference service: ``POST /v1/chat/completions``, ``GET /v1/models``.

A chat request goes the way a rollout worker's turn goes, inside the service: its prompt is built
(:mod:`.prompt`: offload, headers, render or bridge), its sampling translated (:mod:`.sampling`),
and the ids and descriptors go through :meth:`GenerateService.generate`, so every check of
``/v1/generate`` applies (layout, placeholder runs, fetch by digest, vLLM's own expansion); the
completions are decoded (:mod:`.decoding`) and answered whole or as events (:mod:`.sse`).

Extension fields (the OpenAI client sends them with ``extra_body=``):

* ``mmstore.previous_token_ids``: the previous turn's ids as sampled (its ``prompt_token_ids``
  followed by the chosen choice's ``token_ids``), and ``mmstore.previous_messages_count``: how many
  of this request's ``messages`` they cover (default: through the last assistant message). The
  service bridges (``Renderer.bridge``): only the newer messages are tokenized and appended, the
  sampled tokens are never re-tokenized. ``mmstore.bridge=false`` renders from scratch anyway and
  reports whether that render extends the previous ids (``mmstore.render``; renders that do not
  are counted in ``mmstore_inference_openai_non_extending_renders_total``).
* ``mmstore.run``, ``mmstore.allow_image_tokens``; ``top_k``, ``stop_token_ids`` and
  ``chat_template_kwargs`` at the top level, as vLLM's server names them (``return_token_ids`` is
  accepted: ids are always returned).

The response is OpenAI's plus, as vLLM names them, ``prompt_token_ids`` and each choice's
``token_ids``, and ``mmstore``: descriptors, their ``image_spans`` in ``prompt_token_ids``, the
layout fingerprint, how the prompt was rendered, the offloaded digests and timings. Errors are
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with our codes (and their details).

Deliberate differences from OpenAI and vLLM's server:

* stop strings end the text, not sampling: ``max_tokens`` is spent regardless (:mod:`.decoding`);
* ``top_logprobs`` lists only the sampled token: the engine returns the processed logprob of the
  sampled token (the distribution sampled from), not a top-k;
* ``stream`` sends its events once the completions are sampled (:mod:`.sse`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from mmstore_client import AsyncStoreClient
from mmstore_client.inference import GenerateRequest, GenerateResponse, SamplingOptions
from mmstore_client.offload import OffloadPolicy
from mmstore_client.render import Renderer
from prometheus_client import Counter, Histogram

from ..errors import InferenceError, ModelNotFound
from ..service import GenerateService
from ..settings import InferenceSettings
from . import sse
from .decoding import CompletionDecoder, CompletionParser, DecodedChoice
from .errors import ChatError, to_chat_error, unsupported, validation_error
from .prompt import Prompt, PromptBuilder
from .sampling import sampling_for
from .schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ChoiceInfo,
    ChoiceLogprobs,
    MmstoreInfo,
    RenderInfo,
    TokenLogprob,
    TopLogprob,
    Usage,
)

log = logging.getLogger("mmstore_inference.openai")
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class OpenAIChat:
    """The OpenAI endpoints over one :class:`GenerateService`; ``router`` goes into the app.

    ``writer`` is a store client with the write scope for the offload (default: the service
    fetcher's), sharing its byte and header caches so offloaded images are not fetched again.
    """

    def __init__(
        self,
        settings: InferenceSettings,
        service: GenerateService,
        *,
        writer: AsyncStoreClient | None = None,
    ) -> None:
        self.settings, self.service = settings, service
        self.writer = writer
        self.model_id = settings.served_model_name or settings.model.name
        self.created = int(time.time())
        renderer = Renderer.from_pretrained(settings.model)
        self.layout = renderer.layout
        policy = OffloadPolicy(fetch_http=settings.offload_fetch_http, check_size=self.layout.place)
        self.prompts = PromptBuilder(renderer, service.fetcher, writer or service.fetcher.store, policy)
        self.decoder = CompletionDecoder(renderer.tokenizer)
        config = json.loads((settings.model / "config.json").read_text())
        self.parser = CompletionParser(self.decoder, config.get("model_type", self.layout.family))
        r = service.metrics.registry
        name = "mmstore_inference_openai_"
        self.requests = Counter(
            name + "requests", "chat completion requests by outcome", ["code"], registry=r
        )
        self.renders = Counter(
            name + "renders", "chat prompts rendered from scratch (render) or bridged", ["mode"], registry=r
        )
        self.non_extending = Counter(
            name + "non_extending_renders",
            "renders from scratch whose ids do not start with the previous_token_ids sent",
            registry=r,
        )
        self.offloaded = Counter(
            name + "offloaded_images", "inline images offloaded to the store", registry=r
        )
        self.prepare_seconds = Histogram(
            name + "prepare_seconds", "offload + render of a chat request", buckets=_LATENCY, registry=r
        )
        self.router = self._make_router()

    async def aclose(self) -> None:
        if self.writer is not None:
            await self.writer.close()
        self.prompts.close()

    def _make_router(self) -> APIRouter:
        owner = self

        class OpenAIRoute(APIRoute):
            """Every failure of these routes in OpenAI's error shape, body validation included."""

            def get_route_handler(self) -> Callable:
                handler = super().get_route_handler()

                async def route(request: Request) -> Response:
                    try:
                        return await handler(request)
                    except ChatError as exc:
                        return owner._error(exc)
                    except InferenceError as exc:
                        return owner._error(to_chat_error(exc))
                    except RequestValidationError as exc:
                        return owner._error(validation_error(exc))
                    except Exception as exc:  # a bug: still OpenAI's shape, and logged with its trace
                        log.exception("chat request failed")
                        return owner._error(ChatError(500, "internal_error", f"internal error: {exc!r}"))

                return route

        router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)
        router.add_api_route(
            "/chat/completions",
            self.chat_completions,
            methods=["POST"],
            response_model=None,
            responses={
                200: {"model": ChatCompletion, "content": {"text/event-stream": {}}},
                400: {
                    "description": "invalid_request, unsupported_parameter, url_refused, corrupt_image, ..."
                },
                404: {"description": "model_not_found"},
                409: {"description": "placeholder_mismatch, layout_mismatch, descriptor_mismatch"},
                413: {"description": "payload_too_large"},
                422: {"description": "missing_asset"},
                502: {"description": "corrupt_asset"},
                503: {"description": "store_unavailable, engine_unavailable (Retry-After)"},
            },
        )
        router.add_api_route("/models", self.models, methods=["GET"])
        return router

    def _error(self, exc: ChatError) -> JSONResponse:
        self.requests.labels(exc.code).inc()
        log.info("chat error %s %s: %s", exc.status, exc.code, exc.message)
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def models(self) -> dict[str, Any]:
        """The one served model (``id`` is what requests name in ``model``)."""
        model = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "mmstore",
            "root": str(self.settings.model),
            "parent": None,
            "max_model_len": self.settings.max_model_len,
            "mmstore": {"family": self.layout.family, "fingerprint": self.layout.fingerprint},
        }
        return {"object": "list", "data": [model]}

    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        """Chat messages with mmstore refs, data URIs or http(s) image URLs -> completions."""
        started = time.perf_counter()
        if body.model not in (self.model_id, str(self.settings.model)):
            message = f"the model {body.model!r} is not served here; use {self.model_id!r}"
            raise ModelNotFound(message, param="model")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.parses_tool_calls and self.parser.format is None:
            param = "tool_choice" if body.forces_tool_calls else "tools"
            raise unsupported(
                param,
                f"no tool-call format is known for model type {self.parser.model_type!r}, so calls can "
                "be neither parsed nor enforced (see the README)",
            )
        messages = [m.template_message() for m in body.messages]
        run = body.mmstore.run or self.settings.offload_run
        prompt = await self.prompts.build(body, messages, run)
        self._count(prompt)
        t_prepared = time.perf_counter()
        self.prepare_seconds.observe(t_prepared - started)
        ids = prompt.rendered.token_ids
        constraint = None
        if body.forces_tool_calls:  # enforced in the family's own call syntax
            assert body.template_tools is not None and body.template_tool_choice is not None
            constraint = self.parser.tool_call_constraint(
                body.template_tools, body.template_tool_choice, ids, parallel=body.parallel_tool_calls
            )
        sampling = sampling_for(body, len(ids), self.decoder.special, self.settings.max_model_len, constraint)
        result = await self._generate(prompt, sampling.options, request_id)
        choices = await self.prompts.on_tokenizer_thread(
            self.decoder.choices, result.samples, sampling.text_stops, sampling.stop_ids, body.stream
        )
        parsed = await self.prompts.on_tokenizer_thread(
            self.parser.parse, choices, ids, tools=body.parses_tool_calls, parallel=body.parallel_tool_calls
        )
        completion_tokens = sum(len(c.ids) for c in choices)
        usage = Usage(
            prompt_tokens=len(ids),
            completion_tokens=completion_tokens,
            total_tokens=len(ids) + completion_tokens,
            prompt_tokens_details={"cached_tokens": result.usage.cached_prompt_tokens or 0},
        )
        timings = dict(prompt.timings)
        timings |= result.timings.model_dump(exclude={"total_s"}, exclude_none=True)
        timings["total_s"] = time.perf_counter() - started
        mmstore = MmstoreInfo(
            family=self.layout.family,
            fingerprint=self.layout.fingerprint,
            descriptors=prompt.rendered.descriptors,
            image_spans=prompt.rendered.image_spans,
            render=RenderInfo(
                mode=prompt.mode,
                previous_tokens=len(prompt.previous) if prompt.previous is not None else None,
                extends_previous=prompt.extends,
            ),
            run=run if prompt.offloaded else None,
            offloaded=prompt.offloaded,
            timings=timings,
        )
        self.requests.labels("ok").inc()
        head = {"id": request_id, "created": int(time.time()), "model": self.model_id}
        head["system_fingerprint"] = self.layout.fingerprint
        logprobs = [self._logprobs(c, body.top_logprobs) if body.logprobs else None for c in choices]
        if body.stream:
            with_usage = body.stream_options is not None and body.stream_options.include_usage
            events = sse.chunks(
                head,
                choices,
                parsed,
                logprobs,
                usage if with_usage else None,
                result.prompt_token_ids,
                mmstore,
            )
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        choice_list = [
            Choice(
                index=c.index,
                message=AssistantMessage(
                    content=p.content,
                    reasoning_content=p.reasoning_content,
                    tool_calls=[t.openai() for t in p.tool_calls],
                ),
                logprobs=lp,
                finish_reason=sse.finish_reason(c, p),
                stop_reason=c.stop_reason,
                token_ids=c.ids,
                mmstore=ChoiceInfo(tool_call_parse_error=p.parse_error) if p.parse_error else None,
            )
            for c, p, lp in zip(choices, parsed, logprobs, strict=True)
        ]
        # not validated again: the ids are the generate path's, every other part a model already
        response = ChatCompletion.model_construct(
            **head,
            choices=choice_list,
            usage=usage,
            prompt_token_ids=result.prompt_token_ids,
            mmstore=mmstore,
        )
        return Response(response.model_dump_json(), media_type="application/json")

    def _count(self, prompt: Prompt) -> None:
        self.offloaded.inc(len(prompt.offloaded))
        self.renders.labels(prompt.mode).inc()
        if prompt.extends is False:
            self.non_extending.inc()

    async def _generate(self, prompt: Prompt, sampling: SamplingOptions, request_id: str) -> GenerateResponse:
        """The checked generate path of ``/v1/generate``; an error about an image names its part.

        The request is not validated again (``model_construct``): its ids and descriptors are the
        renderer's, its sampling options were validated when built, and the generate path checks
        the ids against the descriptors and vLLM's expansion itself."""
        request = GenerateRequest.model_construct(
            prompt_token_ids=prompt.rendered.token_ids,
            descriptors=prompt.rendered.descriptors,
            sampling=sampling,
            request_id=request_id,
        )
        try:
            return await self.service.generate(request)
        except InferenceError as exc:
            image = exc.details.get("image")
            if isinstance(image, int) and 0 <= image < len(prompt.image_params):
                exc.details.setdefault("param", prompt.image_params[image])
            raise

    def _logprobs(self, c: DecodedChoice, top: int | None) -> ChoiceLogprobs:
        entries = []
        for tok, lp in zip(c.ids, c.logprobs or [], strict=False):
            piece = self.decoder.piece(tok)
            entry = TopLogprob(token=piece, logprob=lp, bytes=list(piece.encode()))
            entries.append(TokenLogprob(**entry.model_dump(), top_logprobs=[entry] if top else []))
        return ChoiceLogprobs(content=entries)
