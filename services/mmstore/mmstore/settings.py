"""Configuration: flags override environment variables (``MMSTORE_*``) override defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .storage.s3_layout import parse_url

Scope = Literal["read", "write", "admin"]


# Blobs this large are redirected to the bucket by default: above it, the replica's second hop
# costs more than the redirect's round trip (bench/RESULTS.md, "On S3"); OCI registries do the same.
REDIRECT_MIN_BYTES = 1_000_000


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MMSTORE_", extra="ignore", env_ignore_empty=True)

    host: str = "127.0.0.1"
    port: int = 8700
    root: Path = Field(Path("./data"), description="local storage directory")
    storage: str | None = Field(
        None,
        description="s3://bucket[/prefix]: keep everything in an S3-compatible bucket (AWS_* variables "
        "for credentials, region and AWS_ENDPOINT_URL) instead of the local directory root",
    )
    workers: int = Field(1, ge=1, description="uvicorn worker processes")
    tokens: dict[str, list[Scope]] = Field(
        default_factory=dict,
        description='bearer token -> scopes, JSON: {"tok": ["read", "write"]}. '
        "write includes read, admin includes both. None: open, loopback only.",
    )
    tokens_file: Path | None = Field(None, description="JSON file with the same mapping as tokens")
    max_upload_bytes: int = Field(64 << 20, ge=1, description="413 above this, checked while streaming")
    max_json_bytes: int = Field(
        2 << 20,
        ge=1,
        description="413 above this for JSON and form bodies (blobs:missing, blobs:link, gc, /ui/login); "
        "10,000 digests take about 0.8 MB",
    )
    spool_threshold_bytes: int = Field(
        1 << 20,
        ge=0,
        description="a request body past this many bytes is kept in a temporary file ($TMPDIR) while it "
        "arrives, not in memory",
    )
    head_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="a connection whose request line and headers are not all in within this (from the "
        "connection's start, or its first byte after the previous response) is closed",
    )
    body_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="408 request_timeout (and the connection closed) when a request body sends nothing "
        "for this long; a slow body that keeps coming is not cut",
    )
    keepalive_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="an idle keep-alive connection is closed after this (uvicorn: timeout_keep_alive)",
    )
    max_image_pixels: int = Field(100_000_000, ge=1, description="422 image_too_large above this")
    gc_grace_seconds: float = Field(
        3600.0, ge=0, description="unreferenced blobs younger than this survive GC"
    )
    gc_batch_size: int = Field(
        1000,
        ge=1,
        description="local storage: GC and run deletion commit at most this many blobs at a time, fewer "
        "when that would hold the index's write lock over about 50 ms, releasing it between batches, so "
        "an upload waits at most about one batch",
    )
    min_free_bytes: int = Field(
        64 << 20,
        ge=0,
        description="local storage: uploads answer 507 insufficient_storage rather than leave less free "
        "space than this on the volume; run deletion and GC write their index changes into it",
    )
    fsync: bool = Field(True, description="fsync blobs and the index before acknowledging a PUT")
    fast_blob_path: bool = Field(True, description="serve blob GET/HEAD from a lean ASGI path")
    info_cache_entries: int = Field(100_000, ge=0, description="digest -> BlobInfo entries cached for GET")
    redirect_min_bytes: int | None = Field(
        REDIRECT_MIN_BYTES,
        ge=0,
        description="S3 storage: GET of a blob of at least this many bytes answers 307 with a presigned "
        "URL of the bucket, so its bytes go from the bucket to the client directly (readers must reach "
        "the bucket's endpoint). 'off': every blob streams through the replica",
    )
    redirect_ttl_seconds: int = Field(300, ge=1, le=7 * 86400, description="validity of those presigned URLs")
    max_jpeg_scans: int = Field(
        100,
        ge=1,
        description="422 image_too_complex for a JPEG of more scans (each is a pass over the image)",
    )
    pixel_cache_bytes: int = Field(
        256 << 20,
        ge=0,
        description="bytes of decoded RGB pixels kept from verifying recent uploads (all formats but "
        "JPEG, whose check decodes at 1/8 scale), served by GET /v1/blobs/{digest}/pixels so that "
        "a reader need not decode them again; 0: none kept",
    )
    decode_threads: int | None = Field(
        None, ge=1, description="threads that decode uploads and thumbnails (default: the cores)"
    )
    decode_pixel_budget: int = Field(
        100_000_000,
        ge=1,
        description="pixels (width x height) decoded at once; more decodes wait. An image larger "
        "than the budget decodes alone",
    )
    decode_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="decodes (uploads, thumbnails) run this many nice levels below the server (Linux), "
        "so the request path preempts them",
    )

    @field_validator("storage")
    @classmethod
    def _check_storage(cls, value: str | None) -> str | None:
        if not value:
            return None
        parse_url(value)  # ValueError naming the expected form
        return value

    @field_validator("redirect_min_bytes", mode="before")
    @classmethod
    def _parse_off(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("off", "none") else value

    @field_validator("tokens", mode="before")
    @classmethod
    def _parse_tokens(cls, value: object) -> object:
        return json.loads(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_tokens(self) -> Settings:
        """An empty or blank token would match ``Authorization: Bearer `` and grant its scopes to
        anyone (and, being configured, let the store bind a public address): refused at start-up."""
        for token in self.token_scopes():
            if not token or token != token.strip():
                raise ValueError(
                    f"token {token!r} in MMSTORE_TOKENS / MMSTORE_TOKENS_FILE is empty or has surrounding "
                    "whitespace: use a non-blank token without spaces (e.g. `openssl rand -hex 32`)"
                )
        return self

    def token_scopes(self) -> dict[str, set[str]]:
        """Every token with its effective scopes (implied ones added)."""
        tokens = dict(self.tokens)
        if self.tokens_file:
            try:
                tokens.update(json.loads(self.tokens_file.read_text()))
            except OSError as exc:
                raise ValueError(f"cannot read MMSTORE_TOKENS_FILE {self.tokens_file}: {exc}") from None
        implied = {"read": {"read"}, "write": {"read", "write"}, "admin": {"read", "write", "admin"}}
        return {tok: set().union(*(implied[s] for s in scopes)) for tok, scopes in tokens.items()}
