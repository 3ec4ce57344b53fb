"""Blob routes: upload by digest or by body, read, info, and the missing-digests query."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from mmstore_client.digest import DigestHasher
from mmstore_client.models import BlobInfo, LinkResponse, MissingRequest, MissingResponse
from mmstore_client.pixels import PIXEL_HEIGHT, PIXEL_WIDTH

from ..bodies import json_body, read_body, read_json
from ..deps import READ, WRITE, DigestDep, RunDep, StorageDep, checked_digest
from ..errors import NotFoundError, PixelsNotKeptError, UnsupportedMediaError
from ..ingest import ingest

router = APIRouter(prefix="/v1", tags=["blobs"])

_CREATED_OR_EXISTING = {
    200: {"model": BlobInfo, "description": "already stored (now linked to this run too)"},
    201: {"model": BlobInfo, "description": "stored"},
}


async def _upload(request: Request, run: str, expected: str | None, response: Response) -> BlobInfo:
    state = request.app.state
    # on a bucket, the existence check of the digest the URL names runs while the body arrives
    stored = None
    if expected is not None and state.storage.remote:
        stored = asyncio.ensure_future(state.storage.info_async(expected))
        stored.add_done_callback(lambda task: task.cancelled() or task.exception())  # always retrieved
    hasher = DigestHasher()
    try:
        data = await read_body(request, state.settings.max_upload_bytes, hasher)
    except BaseException:
        if stored is not None:
            stored.cancel()
        raise
    absent = False
    if stored is not None:
        with contextlib.suppress(Exception):  # only a hint: ingest's own existence check answers
            absent = await stored is None
    result = await state.decoder.run_upload(
        functools.partial(
            ingest,
            state.storage,
            state.settings,
            state.metrics,
            state.decoder,
            run,
            data,
            hasher.digest(),
            expected,
            absent,
            state.pixels,
        )
    )
    response.status_code = 201 if result.created else 200
    return result.info


@router.put(
    "/runs/{run}/blobs/{digest}",
    dependencies=[WRITE],
    responses=_CREATED_OR_EXISTING,
    summary="Upload a blob under its digest (verified) and link it to a run",
    openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {}}}},
)
async def put_blob(request: Request, run: RunDep, digest: DigestDep, response: Response) -> BlobInfo:
    return await _upload(request, run, digest, response)


@router.post(
    "/runs/{run}/blobs",
    dependencies=[WRITE],
    responses=_CREATED_OR_EXISTING,
    summary="Upload a blob; the server computes its digest",
    openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {}}}},
)
async def post_blob(request: Request, run: RunDep, response: Response) -> BlobInfo:
    return await _upload(request, run, None, response)


@router.head("/blobs/{digest}", dependencies=[READ], operation_id="head_blob", summary="GET without the body")
@router.get(
    "/blobs/{digest}",
    dependencies=[READ],
    operation_id="get_blob",
    summary="The blob's bytes (Range, If-None-Match supported)",
    responses={
        200: {"content": {"image/*": {}}},
        206: {"description": "partial content"},
        304: {"description": "not modified"},
    },
)
async def get_blob(
    request: Request,
    digest: DigestDep,
    range: Annotated[str | None, Header()] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    reply = await request.app.state.blob_reader.read(
        digest, head=request.method == "HEAD", range_header=range, if_none_match=if_none_match
    )
    metrics = request.app.state.metrics
    if reply.stream is not None:  # a remote backend's bytes, as they arrive

        async def counted(stream=reply.stream):
            async for chunk in stream:
                metrics.bytes_out.inc(len(chunk))
                yield chunk

        return StreamingResponse(counted(), status_code=reply.status, headers=reply.headers)
    metrics.bytes_out.inc(len(reply.body))
    return Response(reply.body, status_code=reply.status, headers=reply.headers)


@router.get(
    "/blobs/{digest}/pixels",
    dependencies=[READ],
    summary="The decoded pixels the store kept from verifying the upload (8-bit RGB, row-major)",
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "headers": {
                PIXEL_WIDTH: {"description": "width in pixels", "schema": {"type": "integer"}},
                PIXEL_HEIGHT: {"description": "height in pixels", "schema": {"type": "integer"}},
            },
            "description": "width x height x 3 bytes: the decoding rule's RGB pixels, rows top to bottom",
        },
        404: {"description": "`not_found`: no such blob; `pixels_not_kept`: read the bytes and decode them"},
    },
)
async def blob_pixels(request: Request, digest: DigestDep) -> Response:
    state = request.app.state
    kept = state.pixels.get(digest) if state.pixels is not None else None
    if kept is None:
        raise PixelsNotKeptError(
            f"this store process keeps no decoded pixels of {digest} (evicted, a JPEG, an upload "
            "it did not verify itself, or none kept): GET /v1/blobs/{digest} and decode the bytes",
            digest=digest,
        )
    if not await state.blob_reader.stored(digest):  # removed since (GC): not served
        raise NotFoundError(f"blob {digest} not found", digest=digest)
    state.metrics.pixels_served.inc()
    state.metrics.bytes_out.inc(len(kept.data))
    headers = {PIXEL_WIDTH: str(kept.width), PIXEL_HEIGHT: str(kept.height)}
    return Response(kept.data, media_type="application/octet-stream", headers=headers)


@router.post(
    "/runs/{run}/blobs:link",
    dependencies=[WRITE],
    summary="Link already stored blobs to a run without sending bytes; reports those absent",
    openapi_extra=json_body(MissingRequest),
)
async def link_blobs(request: Request, storage: StorageDep, run: RunDep) -> LinkResponse:
    body = await read_json(request, MissingRequest)
    digests = [checked_digest(d) for d in dict.fromkeys(body.digests)]

    def link() -> LinkResponse:
        for d in digests:  # all checked before any is linked: a refused request links nothing
            info = storage.info(d)
            if info is not None and not info.mime.startswith("image/"):
                raise UnsupportedMediaError(
                    f"blob {d} is {info.mime}, not an image: a run's links are images (rollout documents "
                    "are stored with PUT /v1/runs/{run}/rollouts/{digest})",
                    digest=d,
                )
        linked, missing = [], []
        for d in digests:
            info = storage.link_existing(run, d)
            (linked.append(info) if info else missing.append(d))
        return LinkResponse(linked=linked, missing=missing)

    return await run_in_threadpool(link)


@router.get("/blobs/{digest}/info", dependencies=[READ], summary="A blob's metadata")
def blob_info(storage: StorageDep, digest: DigestDep) -> BlobInfo:
    info = storage.info(digest)
    if info is None:
        raise NotFoundError(f"blob {digest} not found", digest=digest)
    return info


@router.post(
    "/blobs:missing",
    dependencies=[READ],
    summary="Which of these digests the store lacks",
    openapi_extra=json_body(MissingRequest),
)
async def missing(request: Request, storage: StorageDep) -> MissingResponse:
    body = await read_json(request, MissingRequest)
    for d in body.digests:
        checked_digest(d)
    return MissingResponse(missing=await run_in_threadpool(storage.missing, body.digests))
