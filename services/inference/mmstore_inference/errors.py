"""The inference service's errors; bodies are ``{"error": {"code", "message", ...}}`` as the store's.

InferenceError
├── InvalidRequest        422 invalid_request      malformed body
├── MissingAsset          422 missing_asset        the store has no blob with this digest
├── PlaceholderMismatch   409 placeholder_mismatch ids, descriptors and vLLM's expansion disagree
├── LayoutMismatch        409 layout_mismatch      descriptor from another family/config/size rule
├── DescriptorMismatch    409 descriptor_mismatch  the image's decoded size is not the descriptor's
├── ImageRefused          422 image_refused        an image the decoding rule or layout refuses
├── CorruptAsset          502 corrupt_asset        bytes that fail verification or decoding
├── StoreUnavailable      503 store_unavailable    the store cannot be reached (Retry-After)
└── EngineUnavailable     503 engine_unavailable   vLLM not ready or dead (Retry-After)
"""

from __future__ import annotations

import functools

from mmstore_client.service_errors import ServiceError, error_class


class InferenceError(ServiceError):
    """The inference service's errors."""


_error = functools.partial(error_class, InferenceError)


InvalidRequest = _error("InvalidRequest", 422, "invalid_request")
MissingAsset = _error("MissingAsset", 422, "missing_asset")
PlaceholderMismatch = _error("PlaceholderMismatch", 409, "placeholder_mismatch")
LayoutMismatch = _error("LayoutMismatch", 409, "layout_mismatch")
DescriptorMismatch = _error("DescriptorMismatch", 409, "descriptor_mismatch")
ImageRefused = _error("ImageRefused", 422, "image_refused")
CorruptAsset = _error("CorruptAsset", 502, "corrupt_asset")
StoreUnavailable = _error("StoreUnavailable", 503, "store_unavailable", retry_after=2)
EngineUnavailable = _error("EngineUnavailable", 503, "engine_unavailable", retry_after=5)
