"""Dependency aliases shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Path, Request

from .errors import InvalidRunError
from .storage.base import RUN_RE, Storage


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def require(scope: str):
    """A dependency that admits only requests whose token has ``scope``."""

    def check(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
        request.app.state.authorizer.check(authorization, scope)

    return Depends(check)


def valid_run(run: Annotated[str, Path(description="run id: [A-Za-z0-9][A-Za-z0-9._-]{0,127}")]) -> str:
    if not RUN_RE.fullmatch(run):
        raise InvalidRunError(
            f"invalid run id {run[:140]!r}: expected [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}", run=run[:140]
        )
    return run


StorageDep = Annotated[Storage, Depends(get_storage)]
RunDep = Annotated[str, Depends(valid_run)]
READ = require("read")
WRITE = require("write")
ADMIN = require("admin")
