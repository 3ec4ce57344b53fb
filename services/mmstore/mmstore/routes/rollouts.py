"""Rollout metadata: one JSON document per rollout, kept as a blob of the run ``<run>.rollouts``.

Rollout workers upload a small :class:`~mmstore_client.rollouts.RolloutDoc` per rollout (turns,
rendered text with image positions, descriptors, rewards) so that people can look at what the
policy saw and said (``/ui``). Why documents are blobs of a companion run, stored through the
same :class:`~mmstore.storage.base.Storage` as the images, rather than files in a directory of
their own:

* durable wherever the images are, with no second setting: the local backend and the S3 one
  (whose replicas share no disk) both already keep blobs;
* content-addressed like images: an upload is verified against its digest and idempotent (a
  retried PUT links the same blob again), the document's id is its digest, ``fsck`` checks
  documents too, and ``DELETE /v1/runs/<run>.rollouts`` then GC removes them;
* a run of its own keeps image runs pure: ``GET /v1/runs/{run}/blobs``, which trainers and
  tools page through, lists only images, and the image upload path (which accepts images only,
  recognised by content) is untouched. Documents are validated against the schema here instead;
  their BlobInfo says ``application/json``, format ``JSON``, 0x0.

What it costs: listings come in digest order (the viewer sorts each page by step), and the
worker's ``rollout_id`` is shown, not indexed: documents are addressed by digest.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from mmstore_client.cache import LRUCache
from mmstore_client.digest import compute_digest
from mmstore_client.models import BlobInfo
from mmstore_client.rollouts import ROLLOUTS_SUFFIX, RolloutDoc, RolloutInfo, RolloutPage, summarize
from pydantic import ValidationError

from ..bodies import read_body
from ..deps import READ, WRITE, DigestDep, RunDep
from ..errors import (
    DigestMismatchError,
    InvalidRequestError,
    InvalidRunError,
    NotFoundError,
)
from ..storage.base import Storage

JSON_MIME = "application/json"
MAX_ROLLOUT_BYTES = 4 << 20  # a rollout document is refs and text: a few KB; 413 above this

router = APIRouter(prefix="/v1", tags=["rollouts"])


def companion_run(run: str) -> str:
    """The run holding ``run``'s rollout documents; refuses ids it cannot be formed from."""
    if run.endswith(ROLLOUTS_SUFFIX):
        raise InvalidRunError(f"run {run!r} already holds rollout documents; use its base run", run=run)
    name = run + ROLLOUTS_SUFFIX
    if len(name) > 128:
        raise InvalidRunError(
            f"run id {run[:40]!r}... is too long for rollouts: at most {128 - len(ROLLOUTS_SUFFIX)} "
            f"characters (its documents live in the run '<run>{ROLLOUTS_SUFFIX}')",
            run=run[:140],
        )
    return name


class RolloutDocs:
    """Rollout documents over a :class:`Storage`; parsed summaries cached by digest (immutable)."""

    def __init__(self, storage: Storage, cache_entries: int = 4096) -> None:
        self.storage = storage
        self._summaries: LRUCache[str, RolloutInfo] = LRUCache(cache_entries)  # shared by threads

    def _remember(self, info: RolloutInfo) -> RolloutInfo:
        self._summaries.put(info.digest, info)
        return info

    def put(self, run: str, data: bytes, expected: str | None) -> tuple[RolloutInfo, bool]:
        """Verify, validate and store a document for ``run``; ``(info, created)``."""
        digest = compute_digest(data)
        if expected is not None and digest != expected:
            raise DigestMismatchError(
                "the body's digest differs from the digest in the URL", expected=expected, actual=digest
            )
        try:
            doc = RolloutDoc.model_validate_json(data)
        except ValidationError as exc:
            errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()[:20]]
            raise InvalidRequestError("not a valid rollout document", errors=errors) from None
        target = companion_run(run)
        info = BlobInfo(digest=digest, size=len(data), mime=JSON_MIME, format="JSON", width=0, height=0)
        created = self.storage.link_existing(target, digest) is None
        if created:
            created = self.storage.put(target, digest, data, info).created
        return self._remember(summarize(doc, digest, len(data))), created

    def read(self, digest: str) -> bytes:
        info = self.storage.info(digest)
        if info is None or info.mime != JSON_MIME:
            raise NotFoundError(f"rollout document {digest} not found", digest=digest)
        try:
            return self.storage.read(digest, 0, info.size)
        except FileNotFoundError:
            raise NotFoundError(f"rollout document {digest} not found", digest=digest) from None

    def get(self, digest: str) -> RolloutDoc:
        return RolloutDoc.model_validate_json(self.read(digest))

    def summary(self, blob: BlobInfo) -> RolloutInfo | None:
        info = self._summaries.get(blob.digest)
        if info is None:
            try:
                doc = self.get(blob.digest)
            except (NotFoundError, ValidationError):
                return None  # collected meanwhile, or not a document (an image PUT to this run)
            info = self._remember(summarize(doc, blob.digest, blob.size))
        return info

    def page(self, run: str, *, limit: int, cursor: str | None) -> RolloutPage | None:
        """One page of ``run``'s rollouts; None when neither the run nor its rollouts exist."""
        blobs = self.storage.run_blobs(companion_run(run), limit=limit, cursor=cursor)
        if blobs is None:
            return RolloutPage(run=run, rollouts=[]) if self.storage.run(run) else None
        rollouts = [s for b in blobs.blobs if b.mime == JSON_MIME and (s := self.summary(b))]
        return RolloutPage(run=run, rollouts=rollouts, next_cursor=blobs.next_cursor)


_CREATED_OR_EXISTING = {
    200: {"model": RolloutInfo, "description": "already stored (linked again)"},
    201: {"model": RolloutInfo, "description": "stored"},
}
_JSON_BODY = {
    "requestBody": {
        "required": True,
        "description": "a RolloutDoc (mmstore_client.rollouts), compact JSON",
        "content": {JSON_MIME: {}},
    }
}


async def _upload(request: Request, run: str, expected: str | None, response: Response) -> RolloutInfo:
    limit = min(MAX_ROLLOUT_BYTES, request.app.state.settings.max_upload_bytes)
    data = await read_body(request, limit)
    info, created = await run_in_threadpool(request.app.state.rollout_docs.put, run, data, expected)
    response.status_code = 201 if created else 200
    return info


@router.put(
    "/runs/{run}/rollouts/{digest}",
    dependencies=[WRITE],
    responses=_CREATED_OR_EXISTING,
    summary="Store a rollout document under its digest (verified, validated) for a run",
    openapi_extra=_JSON_BODY,
)
async def put_rollout(
    request: Request,
    run: RunDep,
    digest: DigestDep,
    response: Response,
) -> RolloutInfo:
    return await _upload(request, run, digest, response)


@router.post(
    "/runs/{run}/rollouts",
    dependencies=[WRITE],
    responses=_CREATED_OR_EXISTING,
    summary="Store a rollout document for a run; the server computes its digest",
    openapi_extra=_JSON_BODY,
)
async def post_rollout(request: Request, run: RunDep, response: Response) -> RolloutInfo:
    return await _upload(request, run, None, response)


@router.get("/runs/{run}/rollouts", dependencies=[READ], summary="A run's rollouts, summarised, by digest")
def list_rollouts(
    request: Request,
    run: RunDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> RolloutPage:
    page = request.app.state.rollout_docs.page(run, limit=limit, cursor=cursor)
    if page is None:
        raise NotFoundError(f"run {run!r} not found", run=run)
    return page


@router.get(
    "/rollouts/{digest}",
    dependencies=[READ],
    summary="A rollout document, as uploaded",
    responses={200: {"content": {JSON_MIME: {}}, "description": "a RolloutDoc, byte for byte"}},
)
def get_rollout(request: Request, digest: DigestDep) -> Response:
    data = request.app.state.rollout_docs.read(digest)
    headers = {"etag": f'"{digest}"', "cache-control": "public, max-age=31536000, immutable"}
    return Response(data, media_type=JSON_MIME, headers=headers)
