"""The error replies of mmstore's services: one base class, one body, one way to declare them.

The store and the inference service answer every error with its HTTP status and the body
``{"error": {"code": ..., "message": ..., **details}}``, which the client's exception tree
(:mod:`mmstore_client.errors`) reads back. Each service declares its own classes under its own
base with :func:`error_class`.
"""

from __future__ import annotations

from typing import Any, TypeVar


class ServiceError(Exception):
    status = 500
    code = "internal_error"
    retry_after: int | None = None  # seconds, sent as ``Retry-After`` (503s)

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        """``code`` narrows the class's code for this error (``invalid_request`` -> ``url_refused``),
        keeping its status; ``details`` go into the body beside code and message."""
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


E = TypeVar("E", bound=ServiceError)


def error_class(base: type[E], name: str, status: int, code: str, retry_after: int | None = None) -> type[E]:
    """A subclass of ``base`` for one status and code, documented by them."""
    attrs = {
        "status": status,
        "code": code,
        "retry_after": retry_after,
        "__doc__": f"{status} {code}",
        "__module__": base.__module__,
    }
    return type(name, (base,), attrs)
