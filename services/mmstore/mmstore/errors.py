"""The store's error hierarchy and the one handler that writes the error body.

Every HTTP error body is ``{"error": {"code": ..., "message": ..., **details}}``::

    ApiError
    ├── InvalidDigestError      400 invalid_digest
    ├── InvalidRunError         400 invalid_run
    ├── InvalidRequestError     400 invalid_request
    ├── UnauthorizedError       401 unauthorized
    ├── ForbiddenError          403 forbidden
    ├── NotFoundError           404 not_found
    ├── RequestTimeoutError     408 request_timeout
    ├── PayloadTooLargeError    413 payload_too_large
    ├── UnsupportedMediaError   415 unsupported_media_type
    ├── RangeNotSatisfiable     416 range_not_satisfiable
    ├── DigestMismatchError     422 digest_mismatch
    ├── CorruptImageError       422 corrupt_image
    ├── ImageTooLargeError      422 image_too_large
    ├── ImageTooComplexError    422 image_too_complex
    └── InsufficientStorageError 507 insufficient_storage
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from mmstore_client import decode
from mmstore_client.service_errors import ServiceError, error_class
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(ServiceError):
    """The store's errors."""


_error = functools.partial(error_class, ApiError)


InvalidDigestError = _error("InvalidDigestError", 400, "invalid_digest")
InvalidRunError = _error("InvalidRunError", 400, "invalid_run")
InvalidRequestError = _error("InvalidRequestError", 400, "invalid_request")
UnauthorizedError = _error("UnauthorizedError", 401, "unauthorized")
ForbiddenError = _error("ForbiddenError", 403, "forbidden")
NotFoundError = _error("NotFoundError", 404, "not_found")
PixelsNotKeptError = _error("PixelsNotKeptError", 404, "pixels_not_kept")
RequestTimeoutError = _error("RequestTimeoutError", 408, "request_timeout")
PayloadTooLargeError = _error("PayloadTooLargeError", 413, "payload_too_large")
UnsupportedMediaError = _error("UnsupportedMediaError", 415, "unsupported_media_type")
RangeNotSatisfiable = _error("RangeNotSatisfiable", 416, "range_not_satisfiable")
DigestMismatchError = _error("DigestMismatchError", 422, "digest_mismatch")
CorruptImageError = _error("CorruptImageError", 422, "corrupt_image")
ImageTooLargeError = _error("ImageTooLargeError", 422, "image_too_large")
ImageTooComplexError = _error("ImageTooComplexError", 422, "image_too_complex")
InsufficientStorageError = _error("InsufficientStorageError", 507, "insufficient_storage")

_IMAGE_ERRORS: dict[type[decode.ImageError], type[ApiError]] = {
    decode.UnsupportedImage: UnsupportedMediaError,
    decode.CorruptImage: CorruptImageError,
    decode.ImageTooLarge: ImageTooLargeError,
    decode.ImageTooComplex: ImageTooComplexError,
}


def from_image_error(exc: decode.ImageError) -> ApiError:
    """Map the decoding rule's refusal to its HTTP error."""
    return _IMAGE_ERRORS.get(type(exc), CorruptImageError)(str(exc))


def error_response(exc: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


# The body was refused before it was all read: the connection is closed after the answer (uvicorn
# does on ``connection: close``) rather than kept for the rest of a body nobody reads.
_CLOSE_AFTER = {RequestTimeoutError.status, PayloadTooLargeError.status}


def install_handlers(app: FastAPI, on_error: Callable[[str], None] = lambda code: None) -> None:
    """Register the handlers; ``on_error(code)`` is called for every error answered."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        on_error(exc.code)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status in _CLOSE_AFTER:
            headers = {"connection": "close"}
        return error_response(exc, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        on_error(InvalidRequestError.code)
        return error_response(InvalidRequestError("malformed request", errors=errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code
        )
