"""Qwen3-VL and Qwen3.5: the Qwen2-VL processor class with Qwen3's constants.

transformers maps these model types to ``Qwen2VLImageProcessor`` itself; only the checkpoints'
``preprocessor_config.json`` differ (patch 16, so factor 32, and a 256x256 to 4096x4096 pixel
budget). The defaults here are those published values, since the class defaults (patch 14)
would be wrong for every Qwen3 checkpoint.
"""

from __future__ import annotations

from typing import Any

from pydantic import PositiveInt

from mmstore_client.layouts.qwen2_vl import Qwen2VLConfig, Qwen2VLLayout
from mmstore_client.layouts.registry import register


class Qwen3VLConfig(Qwen2VLConfig):
    """Qwen3-VL / Qwen3.5 ``preprocessor_config.json``: ``size`` 65536 to 16777216 pixels."""

    patch_size: PositiveInt = 16
    min_pixels: PositiveInt = 65536
    max_pixels: PositiveInt = 16777216


@register("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
class Qwen3VLLayout(Qwen2VLLayout):
    """Same grid (``image_grid_thw``) and placeholder text as :class:`Qwen2VLLayout`."""

    family = "qwen3_vl"
    config_type = Qwen3VLConfig

    @classmethod
    def overrides_from_hf(cls, image_processor: dict[str, Any], processor: dict[str, Any]) -> dict[str, Any]:
        """A saved config falls back to the *class* defaults for keys it lacks, as the
        ``Qwen2VLImageProcessor`` that loads it does (patch 14, not 16)."""
        class_defaults = Qwen2VLConfig().model_dump()
        return class_defaults | super().overrides_from_hf(image_processor, processor)
