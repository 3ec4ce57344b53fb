"""The plugin's configuration: ``MMSTORE_*`` environment variables of the vLLM process.

vLLM owns the command line, so the plugin reads only the environment (pydantic-settings, as the
rest of mmstore). Read once per process, when the first ref is resolved.
"""

from __future__ import annotations

from pathlib import Path

from mmstore_client import decode
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class PluginSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MMSTORE_", extra="ignore", env_ignore_empty=True)

    url: str = Field("http://127.0.0.1:8700", description="the store that mmstore:// refs resolve against")
    token: str | None = Field(None, description="bearer token with the store's read scope")
    timeout_s: float = Field(30.0, gt=0, description="per store request")
    retries: int = Field(2, ge=0, description="store retries on connection errors and 5xx")
    byte_cache_bytes: int = Field(256 << 20, ge=0, description="fetched image bytes kept per process")
    decoded_cache_bytes: int = Field(
        512 << 20, ge=0, description="decoded RGB images kept per process (width*height*3 each)"
    )
    store_pixels: bool = Field(
        True,
        description="take a new image's decoded pixels from the store when it kept them from verifying "
        "the upload (not JPEGs), instead of fetching its bytes and decoding them here",
    )
    max_image_pixels: int = Field(
        decode.DEFAULT_MAX_PIXELS, ge=1, description="refs whose header says more pixels are refused (422)"
    )
    model: Path | None = Field(
        None,
        description="the served checkpoint folder: refs are placed with mmstore's layout for it, so an "
        "image its processor refuses (e.g. aspect ratio) is a 422 naming the digest, not vLLM's bare 400",
    )
