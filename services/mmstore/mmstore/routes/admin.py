"""Admin routes: garbage collection."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from mmstore_client.models import GcReport, GcRequest

from ..bodies import json_body, read_json
from ..deps import ADMIN, StorageDep

router = APIRouter(prefix="/v1", tags=["admin"])


@router.post(
    "/gc",
    dependencies=[ADMIN],
    summary="Delete unreferenced blobs older than the grace period",
    openapi_extra=json_body(GcRequest, required=False),
)
async def gc(request: Request, storage: StorageDep) -> GcReport:
    body = await read_json(request, GcRequest, optional=True)
    grace = body.grace_seconds if body and body.grace_seconds is not None else None
    if grace is None:
        grace = request.app.state.settings.gc_grace_seconds
    return await run_in_threadpool(storage.gc, grace)
