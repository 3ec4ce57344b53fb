"""Run routes: list, inspect, page through blobs, delete (unlink)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from mmstore_client.models import RunBlobPage, RunDeleted, RunInfo, RunList

from ..deps import READ, WRITE, RunDep, StorageDep
from ..errors import NotFoundError

router = APIRouter(prefix="/v1/runs", tags=["runs"])


def _not_found(run: str) -> NotFoundError:
    return NotFoundError(f"run {run!r} not found", run=run)


@router.get("", dependencies=[READ], summary="All runs with their blob counts and bytes")
def list_runs(storage: StorageDep) -> RunList:
    return RunList(runs=storage.runs())


@router.get("/{run}", dependencies=[READ], summary="One run's blob count and bytes")
def get_run(storage: StorageDep, run: RunDep) -> RunInfo:
    info = storage.run(run)
    if info is None:
        raise _not_found(run)
    return info


@router.get("/{run}/blobs", dependencies=[READ], summary="A run's blobs, paginated by digest")
def run_blobs(
    storage: StorageDep,
    run: RunDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> RunBlobPage:
    page = storage.run_blobs(run, limit=limit, cursor=cursor)
    if page is None:
        raise _not_found(run)
    return page


@router.delete(
    "/{run}",
    dependencies=[WRITE],
    summary="Unlink a run's blobs; blobs no live run references become garbage for GC",
)
def delete_run(storage: StorageDep, run: RunDep) -> RunDeleted:
    deleted = storage.delete_run(run)
    if deleted is None:
        raise _not_found(run)
    return deleted
