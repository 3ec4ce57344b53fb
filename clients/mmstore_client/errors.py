"""Exceptions raised by mmstore's clients.

    MmstoreError
    ├── TransportError            the service could not be reached (after retries)
    ├── ApiError                  the service answered with an error body
    │   ├── BadRequestError       400: invalid_digest, invalid_run, invalid_request
    │   ├── AuthError             401 unauthorized, 403 forbidden
    │   ├── NotFoundError         404 not_found (and missing_asset from inference)
    │   ├── RejectedError         413/415/422: payload_too_large, unsupported_media_type,
    │   │                         digest_mismatch, corrupt_image, image_too_large, ...
    │   ├── ConflictError         409: placeholder_mismatch, layout_mismatch
    │   └── ServerError           5xx after retries (store_unavailable, corrupt_asset, ...)
    └── IntegrityError            bytes received do not hash to the digest asked for

Every ApiError carries ``status``, ``code`` (machine-readable), ``message`` and ``details``.
"""

from __future__ import annotations

from typing import Any

import httpx


class MmstoreError(Exception):
    """Base of every client error."""


class TransportError(MmstoreError):
    """Connection failures and timeouts that outlasted the retries."""


class IntegrityError(MmstoreError):
    """Downloaded bytes do not match their digest; they are never returned or cached."""

    def __init__(self, digest: str, actual: str) -> None:
        super().__init__(f"bytes served for {digest} hash to {actual}")
        self.digest = digest
        self.actual = actual


class ApiError(MmstoreError):
    def __init__(self, status: int, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


class BadRequestError(ApiError): ...


class AuthError(ApiError): ...


class NotFoundError(ApiError): ...


class RejectedError(ApiError): ...


class ConflictError(ApiError): ...


class ServerError(ApiError): ...


def _class_for(status: int) -> type[ApiError]:
    if status in (401, 403):
        return AuthError
    if status == 404:
        return NotFoundError
    if status == 409:
        return ConflictError
    if status >= 500:
        return ServerError
    if status in (413, 415, 422):
        return RejectedError
    return BadRequestError


def error_from_response(response: httpx.Response) -> ApiError:
    """Build the ApiError for an error response (any body shape)."""
    code, message, details = f"http_{response.status_code}", response.reason_phrase, {}
    try:
        err = response.json()["error"]
        code, message = err.pop("code"), err.pop("message")
        details = err
    except Exception:
        if response.content:
            message = response.text[:300]
    return _class_for(response.status_code)(response.status_code, code, message, details)
