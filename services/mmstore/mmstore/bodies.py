"""Reading request bodies: always bounded, spooled to a file past a threshold, read only after auth.

Every route that takes a body reads it through here, in its handler, so the route's auth
dependency has answered first: an anonymous client never gets a byte of its body read. (FastAPI
reads and parses a declared body parameter before any dependency runs, which is why JSON routes
take ``Request`` and call :func:`read_json` instead of declaring the model.)

A body past ``spool_threshold_bytes`` goes to a temporary file (``$TMPDIR``) as it arrives, so a
client that stalls one byte short of the upload limit holds a file, not the process's memory;
the body timeout (:mod:`.timeouts`) then closes it.
"""

from __future__ import annotations

import tempfile
from typing import TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from mmstore_client.digest import DigestHasher
from pydantic import BaseModel, ValidationError

from .errors import InvalidRequestError, PayloadTooLargeError

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, limit: int, hasher: DigestHasher | None = None) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` (never fully buffered).

    ``hasher`` (uploads) is fed each chunk as it arrives, so the digest is ready with the body.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise PayloadTooLargeError(f"body of {declared} bytes is over the limit of {limit}", limit=limit)
    threshold = request.app.state.settings.spool_threshold_bytes
    size = 0
    with tempfile.SpooledTemporaryFile(max_size=threshold) as spool:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"body is over the limit of {limit} bytes", limit=limit)
            spool.write(chunk)
            if hasher is not None:
                hasher.update(chunk)
        spool.seek(0)
        # a spooled body is read back off the event loop (tens of MB take milliseconds)
        return spool.read() if size <= threshold else await run_in_threadpool(spool.read)


async def read_json(request: Request, model: type[M], *, optional: bool = False) -> M | None:
    """The body parsed as ``model`` (400 ``invalid_request`` if it is not), bounded by
    ``max_json_bytes`` (413); None for an empty body when ``optional``."""
    data = await read_body(request, request.app.state.settings.max_json_bytes)
    if optional and not data.strip():
        return None
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        errors = [{"loc": ["body", *e["loc"]], "msg": e["msg"]} for e in exc.errors()[:20]]
        raise InvalidRequestError("malformed request", errors=errors) from None


def json_body(model: type[BaseModel], *, required: bool = True) -> dict:
    """``openapi_extra`` documenting a body that :func:`read_json` reads as ``model``."""
    content = {"application/json": {"schema": model.model_json_schema()}}
    return {"requestBody": {"required": required, "content": content}}
