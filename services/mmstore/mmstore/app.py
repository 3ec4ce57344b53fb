"""``create_app(settings)``: wires storage, auth, metrics, routers and error handlers."""

from __future__ import annotations

import gc

from fastapi import FastAPI

from . import __version__
from .auth import Authorizer
from .blob_read import BlobReader
from .decoding import Decoder
from .errors import install_handlers
from .fastpath import BlobFastPath
from .metrics import MetricsMiddleware, StoreMetrics
from .pixels import pixel_cache
from .routes import admin, blobs, health, rollouts, runs, ui
from .settings import Settings
from .storage import open_storage
from .timeouts import BodyTimeout


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    storage = open_storage(settings)
    metrics = StoreMetrics()
    authorizer = Authorizer(settings.token_scopes())
    decoder = Decoder(
        threads=settings.decode_threads, pixel_budget=settings.decode_pixel_budget, nice=settings.decode_nice
    )
    reader = BlobReader(
        storage,
        settings.info_cache_entries,
        redirect_min_bytes=settings.redirect_min_bytes if storage.remote else None,
        redirect_ttl_seconds=settings.redirect_ttl_seconds,
    )

    app = FastAPI(
        title="mmstore",
        version=__version__,
        description="Content-addressed, run-scoped image asset store. Errors: "
        '`{"error": {"code": ..., "message": ...}}`.',
    )
    app.state.settings = settings
    app.state.storage = storage
    app.state.metrics = metrics
    app.state.authorizer = authorizer
    app.state.blob_reader = reader
    app.state.decoder = decoder
    app.state.pixels = pixel_cache(settings.pixel_cache_bytes)
    app.state.rollout_docs = rollouts.RolloutDocs(storage)
    app.state.viewer = ui.Viewer.create(settings, storage, decoder, metrics)
    install_handlers(app, on_error=lambda code: metrics.errors.labels(code).inc())

    for router in (blobs.router, runs.router, rollouts.router, admin.router, health.router, ui.router):
        app.include_router(router)
    # the last added middleware is the outermost: the fast path answers before the metrics
    # middleware (it counts its own requests), everything else is counted there.
    app.add_middleware(BodyTimeout, seconds=settings.body_timeout_seconds)  # inside: its 408 is counted
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.fast_blob_path:
        app.add_middleware(BlobFastPath, reader=reader, authorizer=authorizer, metrics=metrics)
    return app


def serving_app() -> FastAPI:
    """The app of a server process (``mmstore serve``'s factory): :func:`create_app`, then what
    start-up made (modules, routes, models: ~77k objects the collector tracks, living as long as
    the process) frozen out of the garbage collector's sight, so a full collection walks only what
    came since (with them: 10-380 ms by the machine's load, a GET's slowest replies)."""
    app = create_app()
    gc.collect()
    gc.freeze()
    return app
