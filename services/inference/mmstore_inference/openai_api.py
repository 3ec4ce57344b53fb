"""OpenAI-compatible chat on the inference service: ``POST /v1/chat/completions``, ``GET /v1/models``.

A chat request goes the way a rollout worker's turn goes, inside the service:

1. inline images (``data:image/...;base64,`` URIs, http(s) URLs) are offloaded to the store by
   :func:`mmstore_client.offload.aoffload_messages` (the rollout worker's rules and limits, plus the
   layout's size check) under ``mmstore.run`` or the ``offload_run`` setting; mmstore refs pass as
   they are; any other URL (a local path, ``file://``) is refused: the service reads no files;
2. the messages are rendered by :class:`mmstore_client.render.Renderer` over the checkpoint folder,
   image headers read through the service's store client (verified, cached), from scratch, or
   bridged onto the previous turn's ids when the request carries them (below);
3. the ids and descriptors go through :meth:`GenerateService.generate`, so every check of
   ``/v1/generate`` applies (layout, placeholder runs, fetch by digest, vLLM's own expansion).

Extension fields (the OpenAI client sends them with ``extra_body=``):

* ``mmstore.previous_token_ids``: the previous turn's ids as sampled (its ``prompt_token_ids``
  followed by the chosen choice's ``token_ids``), and ``mmstore.previous_messages_count``: how many
  of this request's ``messages`` they cover (default: through the last assistant message). The
  service bridges (``Renderer.bridge``): only the newer messages are tokenized and appended, the
  sampled tokens are never re-tokenized. ``mmstore.bridge=false`` renders from scratch anyway and
  reports whether that render extends the previous ids (``mmstore.render``; renders that do not
  are counted in ``mmstore_inference_openai_non_extending_renders_total``).
* ``mmstore.run``, ``mmstore.allow_image_tokens``; ``top_k`` and ``stop_token_ids`` at the top
  level, as vLLM's server names them (``return_token_ids`` is accepted: ids are always returned).

The response is OpenAI's plus, as vLLM names them, ``prompt_token_ids`` and each choice's
``token_ids``, and ``mmstore``: descriptors, their ``image_spans`` in ``prompt_token_ids``, the
layout fingerprint, how the prompt was rendered, the offloaded digests and timings. Errors are
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with our codes (and their details).

Deliberate differences from OpenAI and vLLM's server:

* ``stop`` strings that are one special token (``<|im_end|>``) become stop token ids; other stop
  strings are applied to the decoded completion after sampling: the tokens through the one that
  completes the stop string are kept (as vLLM keeps them), the text ends before it. Sampling does
  not end early, so ``max_tokens`` is spent regardless.
* ``top_logprobs`` lists only the sampled token: the engine returns the processed logprob of the
  sampled token (the distribution sampled from), not a top-k.
* ``stream`` sends server-sent events once the completions are sampled: the engine call is the
  checked generate path, which returns finished completions; so the first chunk comes with the
  last token, and an error is an ordinary error response, never a broken stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from mmstore_client import AsyncStoreClient, IntegrityError, InvalidRef, NotFoundError, parse_ref
from mmstore_client.descriptor import Descriptor, ProcessedPayloadError
from mmstore_client.errors import ApiError, AuthError, BadRequestError, TransportError
from mmstore_client.inference import Completion, GenerateRequest, GenerateResponse, SamplingOptions
from mmstore_client.layouts import LayoutRefusal
from mmstore_client.offload import OffloadError, OffloadPolicy, aoffload_messages
from mmstore_client.placeholders import PlaceholderMismatch as IdsMismatch
from mmstore_client.placeholders import check_runs
from mmstore_client.render import Rendered, Renderer, RenderError
from prometheus_client import Counter, Histogram
from pydantic import ValidationError

from .errors import EngineUnavailable, InferenceError
from .openai_schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    ChatError,
    Choice,
    ChoiceLogprobs,
    MmstoreInfo,
    RenderInfo,
    TokenLogprob,
    TopLogprob,
    Usage,
    from_inference,
    invalid,
    validation_error,
)
from .service import GenerateService
from .settings import InferenceSettings

log = logging.getLogger("mmstore_inference.openai")
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

# -- rendering and decoding ----------------------------------------------------------------------


class _CachingRenderer(Renderer):
    """The renderer with descriptors kept by digest (content-addressed, one layout: never stale),
    so a conversation's images are not fetched and placed again every turn."""

    max_entries = 16384

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._described: OrderedDict[str, Descriptor] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, digest: str) -> bool:
        with self._lock:
            return digest in self._described

    def describe(self, digest: str) -> Descriptor:
        with self._lock:
            if (desc := self._described.get(digest)) is not None:
                self._described.move_to_end(digest)
                return desc
        desc = super().describe(digest)
        with self._lock:
            self._described[digest] = desc
            while len(self._described) > self.max_entries:
                self._described.popitem(last=False)
        return desc


@dataclass
class _Prompt:
    rendered: Rendered
    mode: Literal["render", "bridge"]
    previous: list[int] | None  # the previous_token_ids the client sent
    extends: bool | None  # whether rendered.token_ids start with them (None: none sent)


@dataclass
class _Choice:
    index: int
    ids: list[int]  # through the token that completes a stop string
    logprobs: list[float] | None
    finish: str
    stop_reason: int | str | None
    text: str
    deltas: list[str] = field(default_factory=list)  # one per token, when streaming


class _Decoder:
    """Completion ids -> text: stop strings, per-token pieces, streaming deltas."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special: dict[str, int] = tokenizer.get_added_vocab()  # "<|im_end|>" -> id, ...
        self._pieces: dict[int, str] = {}

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def piece(self, token: int) -> str:
        if (p := self._pieces.get(token)) is None:
            p = self._pieces[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return p

    def cut_at_stop(self, ids: Sequence[int], stops: Sequence[str]) -> tuple[int, str, str] | None:
        """``(tokens kept, text, stop)`` at the first token whose text completes a stop string."""
        if not stops or not any(s in self.text(ids) for s in stops):
            return None
        lo, hi = 1, len(ids)  # the shortest prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if any(s in self.text(ids[:mid]) for s in stops) else (mid + 1, hi)
        text = self.text(ids[:lo])
        pos, stop = min((text.find(s), s) for s in stops if s in text)
        return lo, text[:pos], stop

    def deltas(self, ids: Sequence[int], final: str) -> list[str]:
        """One text delta per token, concatenating to ``final`` (vLLM's incremental detokenizing:
        text is held back while it ends in an incomplete character; nothing past a stop is sent)."""
        out, sent, prefix_at, read_at = [], "", 0, 0
        for i in range(1, len(ids) + 1):
            before, now = self.text(ids[prefix_at:read_at]), self.text(ids[prefix_at:i])
            delta = ""
            if len(now) > len(before) and not now.endswith("\ufffd"):
                delta, prefix_at, read_at = now[len(before) :], read_at, i
            if not final.startswith(sent + delta):
                delta = final[len(sent) : len(sent) + len(delta)] if final.startswith(sent) else ""
            sent += delta
            out.append(delta)
        if out and final.startswith(sent):
            out[-1] += final[len(sent) :]
        return out


def _image_urls(messages: Sequence[dict]) -> list[tuple[str, str]]:
    """``(where, url)`` of every image part, in the order the renderer numbers the images."""
    return [
        (f"messages[{i}].content[{j}].image_url.url", part["image_url"]["url"])
        for i, m in enumerate(messages)
        if isinstance(m.get("content"), list)
        for j, part in enumerate(m["content"])
        if isinstance(part, dict) and "image_url" in part
    ]


def _after_last_assistant(messages: Sequence[dict]) -> int:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise invalid(
            "previous_token_ids given, but no assistant message to continue from",
            "mmstore.previous_token_ids",
        )
    return len(roles) - roles[::-1].index("assistant")


# -- the endpoints -------------------------------------------------------------------------------


class OpenAIChat:
    """The OpenAI endpoints over one :class:`GenerateService`; ``router`` goes into the app.

    ``store`` is the service's store client (reads); ``writer`` one with the write scope for the
    offload (default: ``store``), sharing its byte cache so offloaded bytes are not fetched again.
    """

    def __init__(
        self,
        settings: InferenceSettings,
        service: GenerateService,
        store: AsyncStoreClient,
        *,
        writer: AsyncStoreClient | None = None,
    ) -> None:
        self.settings, self.service, self.store = settings, service, store
        self.writer = writer or store
        self.model_id = settings.served_model_name or settings.model.name
        self.created = int(time.time())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._local = threading.local()
        # a tokenizer must not be used from two threads at once: all its work runs on this one
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openai-render")
        self.renderer = _CachingRenderer.from_pretrained(settings.model, self._fetch)
        self.decoder = _Decoder(self.renderer.tokenizer)
        self.layout = self.renderer.layout
        self.policy = OffloadPolicy(fetch_http=settings.offload_fetch_http, check_size=self.layout.place)
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
        if self.writer is not self.store:
            await self.writer.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

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
                422: {"description": "missing_asset, image_refused"},
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
        self._loop = asyncio.get_running_loop()
        if body.model not in (self.model_id, str(self.settings.model)):
            message = f"the model {body.model!r} is not served here; use {self.model_id!r}"
            raise ChatError(404, "model_not_found", message, "model")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        messages = [m.template_message() for m in body.messages]
        locations = [where for where, _ in _image_urls(messages)]
        run = body.mmstore.run or self.settings.offload_run
        messages, offloaded = await self._offload(messages, run)
        t_offload = time.perf_counter()
        prompt = await self._render(body, messages)
        t_render = time.perf_counter()
        self.prepare_seconds.observe(t_render - started)
        result, text_stops, stop_ids = await self._generate(body, prompt, request_id, locations)
        choices = await self._in_executor(self._choices, result.samples, text_stops, stop_ids, body.stream)

        ids = prompt.rendered.token_ids
        completion_tokens = sum(len(c.ids) for c in choices)
        usage = Usage(
            prompt_tokens=len(ids),
            completion_tokens=completion_tokens,
            total_tokens=len(ids) + completion_tokens,
            prompt_tokens_details={"cached_tokens": result.usage.cached_prompt_tokens or 0},
        )
        timings = {"offload_s": t_offload - started, "render_s": t_render - t_offload}
        timings |= result.timings.model_dump(exclude={"total_s"}) | {"total_s": time.perf_counter() - started}
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
            run=run if offloaded else None,
            offloaded=offloaded,
            timings=timings,
        )
        self.requests.labels("ok").inc()
        head = {"id": request_id, "created": int(time.time()), "model": self.model_id}
        head["system_fingerprint"] = self.layout.fingerprint
        if body.stream:
            with_usage = body.stream_options is not None and body.stream_options.include_usage
            events = self._events(
                head, choices, body, usage if with_usage else None, result.prompt_token_ids, mmstore
            )
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        choice_list = [
            Choice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=self._logprobs(c, body.top_logprobs) if body.logprobs else None,
                finish_reason=c.finish,
                stop_reason=c.stop_reason,
                token_ids=c.ids,
            )
            for c in choices
        ]
        response = ChatCompletion(
            **head,
            choices=choice_list,
            usage=usage,
            prompt_token_ids=result.prompt_token_ids,
            mmstore=mmstore,
        )
        return Response(response.model_dump_json(), media_type="application/json")

    async def _generate(
        self, body: ChatCompletionRequest, prompt: _Prompt, request_id: str, locations: list[str]
    ) -> tuple[GenerateResponse, list[str], set[int]]:
        """The sampling options, then the checked generate path of ``/v1/generate``."""
        ids = prompt.rendered.token_ids
        special = self.decoder.special
        text_stops = [s for s in body.stops if s not in special]
        stop_ids = [*(body.stop_token_ids or []), *(special[s] for s in body.stops if s in special)]
        limit = self.settings.max_model_len
        max_tokens = body.max_completion_tokens or body.max_tokens or limit - len(ids)
        if len(ids) + max(max_tokens, 1) > limit:
            message = (
                f"the context is {limit} tokens: {len(ids)} in the prompt leave no room for {max_tokens}"
            )
            raise invalid(message, "max_tokens", "context_length_exceeded")
        try:
            sampling = SamplingOptions(
                n=body.n,
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=max(body.top_k or 0, 0),
                seed=body.seed,
                stop_token_ids=stop_ids,
                logprobs=body.logprobs,
                allow_image_tokens=body.mmstore.allow_image_tokens,
            )
        except ValidationError as exc:
            raise validation_error(exc) from None
        request = GenerateRequest(
            prompt_token_ids=ids,
            descriptors=prompt.rendered.descriptors,
            sampling=sampling,
            request_id=request_id,
        )
        try:
            return await self.service.generate(request), text_stops, set(stop_ids)
        except InferenceError as exc:
            raise from_inference(exc, locations) from None
        except ValueError as exc:  # vLLM's own input validation
            raise invalid(f"vLLM refused the request: {exc}") from None
        except Exception as exc:
            if self.service.engine.ready:
                raise
            raise from_inference(EngineUnavailable(f"the vLLM engine failed: {exc!r}"), locations) from None

    # -- steps ---------------------------------------------------------------------------------
    async def _offload(self, messages: list[dict], run: str) -> tuple[list[dict], list[str]]:
        """Refs stay; data URIs and http(s) URLs are offloaded; anything else is refused."""
        refs, inline = set(), False
        for where, url in _image_urls(messages):
            if url.startswith("mmstore://"):
                try:
                    refs.add(parse_ref(url))
                except InvalidRef as exc:
                    raise invalid(str(exc), where, "invalid_ref") from None
            elif url.startswith(("data:", "http://", "https://")):
                inline = True
            else:
                message = f"{where}: an image URL is an mmstore ref, a data:image/...;base64 URI or http(s)"
                raise invalid(f"{message} URL; got {url[:60]!r}", where, "url_refused")
        if not inline:
            return messages, []
        try:
            out = await aoffload_messages(messages, self.writer, run, self.policy)
        except OffloadError as exc:  # the image's fault: 400, as OpenAI answers a bad image
            status = 413 if exc.code == "payload_too_large" else 400
            raise ChatError(status, exc.code, str(exc), f"{exc.where}.image_url.url") from None
        except ProcessedPayloadError as exc:
            raise ChatError(400, exc.code, str(exc), "messages") from None
        except BadRequestError as exc:
            raise invalid(f"the store refused run {run!r}: {exc.message}", "mmstore.run", exc.code) from None
        except AuthError as exc:
            message = f"the store refused the service's upload ({exc.code}): give the service a token with "
            raise ChatError(
                500, "offload_forbidden", message + "the write scope (STORE_WRITE_TOKEN)"
            ) from None
        except (TransportError, ApiError) as exc:
            message = f"store unavailable offloading images: {exc}"
            raise ChatError(503, "store_unavailable", message, None, 2) from None
        digests = dict.fromkeys(parse_ref(url) for _, url in _image_urls(out))
        offloaded = [d for d in digests if d not in refs]
        self.offloaded.inc(len(offloaded))
        return out, offloaded

    async def _render(self, body: ChatCompletionRequest, messages: list[dict]) -> _Prompt:
        # the images the renderer has not described yet, fetched concurrently (verified, cached)
        first_at: dict[str, str] = {}
        for where, url in _image_urls(messages):
            first_at.setdefault(parse_ref(url), where)
        todo = [d for d in first_at if not self.renderer.cached(d)]
        fetched = await asyncio.gather(*(self._get(d, first_at[d]) for d in todo))
        blobs = dict(zip(todo, fetched, strict=True))
        previous, count = body.mmstore.previous_token_ids, None
        if previous is not None:
            count = body.mmstore.previous_messages_count or _after_last_assistant(messages)
            if count >= len(messages) or messages[count - 1]["role"] != "assistant":
                raise invalid(
                    f"previous_messages_count={count}: messages[:{count}] must end with the assistant "
                    "message of previous_token_ids, and at least one new message must follow",
                    "mmstore.previous_messages_count",
                )
        bridge = previous is not None and body.mmstore.bridge
        try:
            return await self._in_executor(self._render_sync, messages, blobs, previous, count, bridge)
        except IdsMismatch as exc:
            raise ChatError(
                409,
                "placeholder_mismatch",
                f"previous_token_ids: {exc}",
                "mmstore.previous_token_ids",
                image=exc.image,
                expected=exc.expected,
                actual=exc.actual,
            ) from None
        except RenderError as exc:
            status = 409 if exc.code == "placeholder_mismatch" else 400
            raise ChatError(status, exc.code, str(exc), "messages") from None
        except (ProcessedPayloadError, LayoutRefusal) as exc:
            raise ChatError(400, exc.code, str(exc), "messages") from None

    def _render_sync(
        self,
        messages: list[dict],
        blobs: dict[str, bytes],
        previous: list[int] | None,
        count: int | None,
        bridge: bool,
    ) -> _Prompt:
        """On the render thread: bridge onto ``previous``, or render from scratch."""
        self._local.blobs = blobs
        try:
            if bridge:
                assert previous is not None and count is not None
                history = messages[:count]
                descriptors = [self.renderer.describe(parse_ref(u)) for _, u in _image_urls(history)]
                runs = check_runs(previous, descriptors, self.renderer.image_token_id)
                before = Rendered(list(previous), descriptors, runs, [False] * len(previous), history)
                self.renders.labels("bridge").inc()
                return _Prompt(self.renderer.bridge(before, messages[count:]), "bridge", previous, True)
            rendered = self.renderer.render(messages)
            self.renders.labels("render").inc()
            extends = None if previous is None else rendered.token_ids[: len(previous)] == previous
            if extends is False:
                self.non_extending.inc()
            return _Prompt(rendered, "render", previous, extends)
        finally:
            self._local.blobs = None

    def _fetch(self, digest: str) -> bytes:
        """The renderer's fetch, on the render thread: this request's prefetched bytes, or the
        service's store client on the event loop."""
        if (data := (getattr(self._local, "blobs", None) or {}).get(digest)) is not None:
            return data
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self._get(digest, None), self._loop).result()

    async def _get(self, digest: str, where: str | None) -> bytes:
        try:
            return await self.store.get(digest)
        except NotFoundError:
            message = f"the store has no blob {digest}"
            raise ChatError(422, "missing_asset", message, where, digest=digest) from None
        except IntegrityError as exc:
            message = f"bytes served for {digest} hash to {exc.actual}"
            raise ChatError(502, "corrupt_asset", message, where, digest=digest) from None
        except (TransportError, ApiError) as exc:
            message = f"store unavailable fetching {digest}: {exc}"
            raise ChatError(503, "store_unavailable", message, where, 2, digest=digest) from None

    async def _in_executor(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _choices(
        self, samples: list[Completion], text_stops: list[str], stop_ids: set[int], stream: bool
    ) -> list[_Choice]:
        """On the render thread: text, stop strings and streaming deltas of each completion."""
        out = []
        for i, s in enumerate(samples):
            ids, lps, finish = list(s.token_ids), s.logprobs, s.finish_reason
            reason: int | str | None = ids[-1] if finish == "stop" and ids and ids[-1] in stop_ids else None
            if (cut := self.decoder.cut_at_stop(ids, text_stops)) is not None:
                kept, text, reason = cut
                ids, lps, finish = ids[:kept], (lps[:kept] if lps is not None else None), "stop"
            else:
                text = self.decoder.text(ids)
            deltas = self.decoder.deltas(ids, text) if stream else []
            out.append(_Choice(i, ids, lps, finish, reason, text, deltas))
        return out

    def _logprobs(self, c: _Choice, top: int | None) -> ChoiceLogprobs:
        entries = []
        for tok, lp in zip(c.ids, c.logprobs or [], strict=False):
            piece = self.decoder.piece(tok)
            entry = TopLogprob(token=piece, logprob=lp, bytes=list(piece.encode()))
            entries.append(TokenLogprob(**entry.model_dump(), top_logprobs=[entry] if top else []))
        return ChoiceLogprobs(content=entries)

    async def _events(
        self,
        head: dict,
        choices: list[_Choice],
        body: ChatCompletionRequest,
        usage: Usage | None,
        prompt_token_ids: list[int],
        mmstore: MmstoreInfo,
    ) -> AsyncIterator[str]:
        """The chunks: per choice a role chunk, one chunk per token (its text delta, id and
        logprob), the last with the finish reason; then usage when asked for, then ``[DONE]``.
        The first chunk also carries ``prompt_token_ids`` and ``mmstore``, as vLLM sends the ids."""

        def chunk(choices_: list[dict], **extra: Any) -> str:
            data = head | {"object": "chat.completion.chunk", "choices": choices_} | extra
            return f"data: {json.dumps(data)}\n\n"

        for c in choices:
            opening = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            if c.index == 0:
                extra = {"mmstore": mmstore.model_dump(mode="json"), "prompt_token_ids": prompt_token_ids}
                yield chunk([opening], **extra)
            else:
                yield chunk([opening])
            lps = self._logprobs(c, body.top_logprobs).model_dump()["content"] if body.logprobs else None
            last = len(c.ids) - 1
            for k, (tok, delta) in enumerate(zip(c.ids, c.deltas, strict=True)):
                yield chunk(
                    [
                        {
                            "index": c.index,
                            "delta": {"content": delta},
                            "logprobs": {"content": [lps[k]]} if lps is not None else None,
                            "finish_reason": c.finish if k == last else None,
                            "stop_reason": c.stop_reason if k == last else None,
                            "token_ids": [tok],
                        }
                    ]
                )
            if not c.ids:
                closing = {
                    "delta": {},
                    "finish_reason": c.finish,
                    "stop_reason": c.stop_reason,
                    "token_ids": [],
                }
                yield chunk([{"index": c.index, **closing}])
        if usage is not None:
            yield chunk([], usage=usage.model_dump())
        yield "data: [DONE]\n\n"
