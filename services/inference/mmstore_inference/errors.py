"""The inference service's errors; bodies are ``{"error": {"code", "message", ...}}`` as the store's.

InferenceError
├── InvalidRequest        400 invalid_request      malformed body; or, keeping the status, a narrower
│                                                  code (url_refused, invalid_ref, not_a_ref,
│                                                  processed_payload, context_length_exceeded,
│                                                  engine_rejected, an image's own refusal, ...)
├── ModelNotFound         404 model_not_found      the request names another model
├── PayloadTooLarge       413 payload_too_large    an inline image over the offload limit
├── MissingAsset          422 missing_asset        the store has no blob with this digest
├── PlaceholderMismatch   409 placeholder_mismatch ids, descriptors and vLLM's expansion disagree
├── LayoutMismatch        409 layout_mismatch      descriptor from another family/config/size rule
├── DescriptorMismatch    409 descriptor_mismatch  the image's decoded size is not the descriptor's
├── OffloadForbidden      500 offload_forbidden    the service's store token lacks the write scope
├── CorruptAsset          502 corrupt_asset        bytes that fail verification or decoding
├── StoreUnavailable      503 store_unavailable    the store cannot be reached (Retry-After)
└── EngineUnavailable     503 engine_unavailable   vLLM not ready or dead (Retry-After)

The generate path and the OpenAI path raise only these; the OpenAI layer translates them once into
OpenAI's error shape (:mod:`mmstore_inference.openai.errors`). A ``param`` detail names the part of
the request at fault (``messages[1].content[0].image_url.url``), an ``image`` detail its index.
"""

from __future__ import annotations

import functools

from mmstore_client.service_errors import ServiceError, error_class


class InferenceError(ServiceError):
    """The inference service's errors."""


_error = functools.partial(error_class, InferenceError)


InvalidRequest = _error("InvalidRequest", 400, "invalid_request")
ModelNotFound = _error("ModelNotFound", 404, "model_not_found")
PayloadTooLarge = _error("PayloadTooLarge", 413, "payload_too_large")
MissingAsset = _error("MissingAsset", 422, "missing_asset")
PlaceholderMismatch = _error("PlaceholderMismatch", 409, "placeholder_mismatch")
LayoutMismatch = _error("LayoutMismatch", 409, "layout_mismatch")
DescriptorMismatch = _error("DescriptorMismatch", 409, "descriptor_mismatch")
OffloadForbidden = _error("OffloadForbidden", 500, "offload_forbidden")
CorruptAsset = _error("CorruptAsset", 502, "corrupt_asset")
StoreUnavailable = _error("StoreUnavailable", 503, "store_unavailable", retry_after=2)
EngineUnavailable = _error("EngineUnavailable", 503, "engine_unavailable", retry_after=5)
