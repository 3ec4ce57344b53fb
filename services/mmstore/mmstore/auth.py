"""Bearer-token auth with read / write / admin scopes.

With no tokens configured every scope is open; the CLI then refuses to bind anything but a
loopback address, so an open store is never reachable from another machine.
"""

from __future__ import annotations

import hmac

from .errors import ForbiddenError, UnauthorizedError


class Authorizer:
    def __init__(self, token_scopes: dict[str, set[str]]) -> None:
        self._tokens = token_scopes

    @property
    def open(self) -> bool:
        return not self._tokens

    def check(self, authorization: str | None, scope: str) -> None:
        """Raise 401 (no/unknown token) or 403 (token lacks ``scope``); return when allowed."""
        if self.open:
            return
        if not authorization or not authorization.lower().startswith("bearer "):
            raise UnauthorizedError("missing bearer token (Authorization: Bearer <token>)")
        presented = authorization[7:].strip().encode()
        if not presented:  # configured tokens are never empty (Settings refuses them): no match
            raise UnauthorizedError("empty bearer token (Authorization: Bearer <token>)")
        for token, scopes in self._tokens.items():
            if hmac.compare_digest(presented, token.encode()):
                if scope not in scopes:
                    raise ForbiddenError(f"token lacks the '{scope}' scope", required_scope=scope)
                return
        raise UnauthorizedError("unknown bearer token")
