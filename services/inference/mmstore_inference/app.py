"""``create_app(settings)``: the inference service (FastAPI) around one vLLM engine."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from mmstore_client import AsyncStoreClient, ByteCache
from mmstore_client.cache import DecodedCache
from mmstore_client.inference import GenerateRequest, GenerateResponse
from mmstore_client.layouts import Layout
from mmstore_client.transport import AiohttpTransport
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import ValidationError

from .engine import Engine
from .errors import InferenceError, InvalidRequest
from .fetch import ImageFetcher
from .metrics import InferenceMetrics
from .openai import OpenAIChat
from .service import GenerateService
from .settings import InferenceSettings

log = logging.getLogger("mmstore_inference")


def create_app(
    settings: InferenceSettings, on_engine_failure: Callable[[str], None] | None = None
) -> FastAPI:
    """The service; the engine starts in the background once the app is served.

    ``on_engine_failure(reason)`` is called if the engine cannot start (a truncated checkpoint,
    too little memory, ...): the command line stops the server and exits non-zero with the reason,
    so a supervisor restarts it or a person sees why, instead of a service that answers /healthz
    forever and is never ready.
    """
    from transformers import AutoTokenizer

    layout = Layout.from_pretrained(settings.model)
    tokenizer = AutoTokenizer.from_pretrained(str(settings.model))
    store = AsyncStoreClient(
        settings.store,
        token=settings.store_token,
        cache=ByteCache(settings.byte_cache_bytes),
        transport=AiohttpTransport(),  # new images' pixels: 2.8 MB a screenshot
    )
    fetcher = ImageFetcher(
        store, DecodedCache(settings.decoded_cache_bytes), store_pixels=settings.store_pixels
    )
    metrics = InferenceMetrics(fetcher)
    engine = Engine(settings)
    service = GenerateService(engine, layout, tokenizer, fetcher, metrics)
    writer = None
    if settings.store_write_token:  # offload of chat requests' inline images; same caches
        writer = AsyncStoreClient(
            settings.store,
            token=settings.store_write_token,
            cache=store.cache,
            header_cache=store.header_cache,
        )
    chat = OpenAIChat(settings, service, writer=writer)

    started_at = time.monotonic()
    failure: list[str] = []  # why the engine could not start, once it could not

    async def start_engine() -> None:
        try:
            await engine.start()
        except Exception as exc:
            log.exception("the vLLM engine failed to start")
            failure.append(f"{type(exc).__name__}: {exc}".strip())
            if on_engine_failure is not None:
                on_engine_failure(failure[0])
            return
        log.info("engine ready: %s (%s, layout %s)", settings.model, layout.family, layout.fingerprint)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        starting = asyncio.create_task(start_engine())  # /healthz answers while vLLM loads
        try:
            yield
        finally:
            starting.cancel()
            engine.shutdown()
            await chat.aclose()
            await store.close()

    app = FastAPI(
        title="mmstore-inference",
        lifespan=lifespan,
        description="vLLM that pulls image bytes from mmstore by digest on every request, token-exact.",
    )
    app.state.service = service
    app.include_router(chat.router)  # /v1/chat/completions, /v1/models: OpenAI's error shape

    def malformed(errors: Sequence[Mapping[str, Any]]) -> InvalidRequest:
        details = [{"loc": [str(x) for x in e["loc"]], "msg": e["msg"]} for e in errors[:20]]
        return InvalidRequest("malformed generate request", errors=details)

    def error(exc: InferenceError) -> JSONResponse:
        metrics.requests.labels(exc.code).inc()
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        log.info("generate error %s: %s", exc.code, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(InferenceError)
    async def _inference_error(_: Request, exc: InferenceError) -> JSONResponse:
        return error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(malformed(exc.errors()))

    @app.post(
        "/v1/generate",
        tags=["generate"],
        response_model=GenerateResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}},
            }
        },
        responses={
            400: {"description": "invalid_request, engine_rejected"},
            409: {"description": "placeholder_mismatch, layout_mismatch, descriptor_mismatch"},
            422: {"description": "missing_asset"},
            502: {"description": "corrupt_asset"},
            503: {"description": "store_unavailable, engine_unavailable (Retry-After)"},
        },
    )
    async def generate(request: Request) -> Response:
        """Generate from rendered token ids and the descriptors of their images."""
        # Parsed and answered by pydantic's JSON core directly: FastAPI's declared body goes
        # through json.loads and Python-mode validation, and the ids of a long conversation (30 k)
        # cost ~4 ms that way, ~2.6 ms this way; the response is built from checked parts.
        try:
            req = GenerateRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise malformed([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
        response = await service.generate(req)
        metrics.requests.labels("ok").inc()
        return Response(response.model_dump_json(), media_type="application/json")

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        if not engine.ready:
            if failure:
                state, message = "failed", f"the vLLM engine failed to start: {failure[0]}; the service exits"
            elif engine.llm is None:
                waited = time.monotonic() - started_at
                state, message = (
                    "starting",
                    f"the vLLM engine is loading {settings.model} ({waited:.0f} s so far)",
                )
            else:
                state, message = "errored", "the vLLM engine stopped after an error (see the service's log)"
            body = {"error": {"code": "engine_unavailable", "message": message, "state": state}}
            return JSONResponse(body, 503, headers={"Retry-After": "5"})
        return JSONResponse(
            {
                "status": "ready",
                "model": str(settings.model),
                "family": layout.family,
                "fingerprint": layout.fingerprint,
            }
        )

    @app.get("/metrics", tags=["health"])
    def metrics_route() -> Response:
        # ours, then vLLM's own (prefix/mm cache hits, queue) from the default registry
        body = generate_latest(metrics.registry) + generate_latest(REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app
