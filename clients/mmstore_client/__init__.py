"""mmstore_client: the contract every mmstore component imports, and the thin clients."""

from .cache import ByteCache
from .digest import InvalidDigest, InvalidRef, compute_digest, is_digest, is_ref, make_ref, parse_ref
from .errors import (
    ApiError,
    AuthError,
    BadRequestError,
    ConflictError,
    IntegrityError,
    MmstoreError,
    NotFoundError,
    RejectedError,
    ServerError,
    TransportError,
)
from .models import BlobInfo, GcReport, LinkResponse, RunBlobPage, RunDeleted, RunInfo
from .samples import Sample, SampleFileError, read_samples, sample_from_rendered, write_samples
from .store import AsyncStoreClient, StoreClient

__all__ = [
    "ApiError",
    "AsyncStoreClient",
    "AuthError",
    "BadRequestError",
    "BlobInfo",
    "ByteCache",
    "ConflictError",
    "GcReport",
    "IntegrityError",
    "InvalidDigest",
    "InvalidRef",
    "LinkResponse",
    "MmstoreError",
    "NotFoundError",
    "RejectedError",
    "RunBlobPage",
    "RunDeleted",
    "RunInfo",
    "Sample",
    "SampleFileError",
    "ServerError",
    "StoreClient",
    "TransportError",
    "compute_digest",
    "is_digest",
    "is_ref",
    "make_ref",
    "parse_ref",
    "read_samples",
    "sample_from_rendered",
    "write_samples",
]
