"""Admin routes: garbage collection."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from mmstore_client.models import GcReport, GcRequest

from ..deps import ADMIN, StorageDep

router = APIRouter(prefix="/v1", tags=["admin"])


@router.post("/gc", dependencies=[ADMIN], summary="Delete unreferenced blobs older than the grace period")
async def gc(request: Request, storage: StorageDep, body: GcRequest | None = None) -> GcReport:
    grace = body.grace_seconds if body and body.grace_seconds is not None else None
    if grace is None:
        grace = request.app.state.settings.gc_grace_seconds
    return await run_in_threadpool(storage.gc, grace)
