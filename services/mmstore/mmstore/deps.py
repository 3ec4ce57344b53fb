"""Dependency aliases shared by the routers, and the one check of each path parameter.

``RunDep`` and ``DigestDep`` validate a path's run id and digest before a handler runs (400
``invalid_run`` / ``invalid_digest``); :func:`checked_digest` is the same digest check for digests
that come in bodies, and for the blob fast path, which answers before FastAPI sees a request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Path, Request
from mmstore_client.digest import is_digest, is_run_id

from .errors import InvalidDigestError, InvalidRunError
from .storage.base import Storage


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def require(scope: str):
    """A dependency that admits only requests whose token has ``scope``."""

    def check(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
        request.app.state.authorizer.check(authorization, scope)

    return Depends(check)


def valid_run(run: Annotated[str, Path(description="run id: [A-Za-z0-9][A-Za-z0-9._-]{0,127}")]) -> str:
    if not is_run_id(run):
        raise InvalidRunError(
            f"invalid run id {run[:140]!r}: expected [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}", run=run[:140]
        )
    return run


def checked_digest(digest: str) -> str:
    """``digest`` if it is ``blake3:<64 lowercase hex>``, else 400 ``invalid_digest``."""
    if not is_digest(digest):
        raise InvalidDigestError(
            f"invalid digest {digest[:100]!r}: expected blake3:<64 lowercase hex>", digest=digest[:100]
        )
    return digest


def valid_digest(digest: Annotated[str, Path(description="blake3:<64 lowercase hex> of the bytes")]) -> str:
    return checked_digest(digest)


StorageDep = Annotated[Storage, Depends(get_storage)]
RunDep = Annotated[str, Depends(valid_run)]
DigestDep = Annotated[str, Depends(valid_digest)]
READ = require("read")
WRITE = require("write")
ADMIN = require("admin")
