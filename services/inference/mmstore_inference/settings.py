"""Configuration of the inference service: flags > ``MMSTORE_INFERENCE_*`` env vars > defaults."""

from __future__ import annotations

from pathlib import Path

from mmstore_client.digest import RUN_ID_PATTERN as RUN_PATTERN  # the store's run ids
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class InferenceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MMSTORE_INFERENCE_", extra="ignore", protected_namespaces=()
    )

    model: Path = Field(description="checkpoint folder (config.json, processor and tokenizer files, weights)")
    store: str = Field("http://127.0.0.1:8700", description="mmstore URL")
    store_token: str | None = Field(None, description="bearer token with the read scope")
    host: str = "127.0.0.1"
    port: int = 8800
    # vLLM
    dtype: str = Field("auto", description="vLLM dtype; auto: float32 on CPU, bfloat16 on GPU")
    logprobs_mode: str = Field(
        "processed_logprobs",
        description="vLLM logprobs_mode: processed_logprobs are those of the distribution sampled from "
        "(after temperature/top-k/top-p), which is what the trainer's importance ratio compares with",
    )
    cpu_kvcache_gib: int = Field(
        1, ge=1, description="KV cache on CPU (sets VLLM_CPU_KVCACHE_SPACE if unset)"
    )
    max_model_len: int = Field(4096, ge=16)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="on CPU: fraction of RAM")
    enforce_eager: bool = False
    max_images_per_prompt: int = Field(16, ge=1)
    seed: int = 0
    # caches (content-addressed: never stale)
    byte_cache_bytes: int = Field(512 << 20, ge=0, description="fetched image bytes kept by digest")
    decoded_cache_bytes: int = Field(512 << 20, ge=0, description="decoded RGB images kept by digest")
    store_pixels: bool = Field(
        True,
        description="take a new image's decoded pixels from the store when it kept them from verifying "
        "the upload (not JPEGs), instead of fetching its bytes and decoding them here",
    )
    # policy
    forbid_image_tokens: bool = Field(True, description="default for sampling.allow_image_tokens=False")
    # the OpenAI-compatible endpoint (/v1/chat/completions, /v1/models)
    served_model_name: str | None = Field(
        None, description="the model id of /v1/models and of requests' `model`; default: the folder's name"
    )
    store_write_token: str | None = Field(
        None,
        description="token with the write scope, to offload chat requests' inline images (else store_token)",
    )
    offload_run: str = Field(
        "openai", pattern=RUN_PATTERN, description="store run of offloaded images when a request names none"
    )
    offload_fetch_http: bool = Field(
        True, description="fetch chat requests' http(s) image URLs and offload them (false: refuse them)"
    )
