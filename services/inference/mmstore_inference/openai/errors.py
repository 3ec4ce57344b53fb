"""OpenAI's error shape for the chat endpoints, and the one translation of the service's errors.

Every failure of these routes is answered as OpenAI answers it,
``{"error": {"message", "type", "param", "code", ...details}}``, with our codes. The service's own
errors (:class:`~mmstore_inference.errors.InferenceError`, raised by the generate path and by the
chat path's offload and render steps) keep their status and code; :func:`to_chat_error` moves their
``param`` detail into OpenAI's field. Body validation errors become ``invalid_request`` naming the
first field at fault.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from mmstore_client.service_errors import ServiceError
from pydantic import ValidationError

from ..errors import InferenceError


class ChatError(ServiceError):
    """An error of the chat endpoints: a status and code of its own, OpenAI's body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        retry_after: int | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message, code=code, **details)
        self.status, self.param, self.retry_after = status, param, retry_after

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
            | self.details
        }


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ChatError:
    return ChatError(400, code, message, param)


def unsupported(param: str, why: str) -> ChatError:
    return ChatError(400, "unsupported_parameter", f"{param}: {why}", param)


def to_chat_error(exc: InferenceError) -> ChatError:
    """The service's error as the chat endpoints answer it: same status, code and details."""
    details = dict(exc.details)
    param = details.pop("param", None)
    return ChatError(exc.status, exc.code, exc.message, param, exc.retry_after, **details)


def _param_of(loc: Sequence[Any]) -> str:
    """``("body", "messages", 1, "content", "list[...]", 0, "text")`` -> ``messages[1].content[0].text``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part != "body":
            out += f".{part}" if out else part
    return out


def validation_error(exc: RequestValidationError | ValidationError) -> ChatError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return invalid(f"the body is not valid JSON: {first['msg']}")
    param = _param_of(first["loc"]) or None
    listed = [{"param": _param_of(e["loc"]), "msg": e["msg"]} for e in errors]
    return ChatError(400, "invalid_request", f"{param or 'body'}: {first['msg']}", param, errors=listed)
