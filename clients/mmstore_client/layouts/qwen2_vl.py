"""Qwen2-VL and Qwen2.5-VL: ``Qwen2VLImageProcessor``'s ``smart_resize`` with min/max pixels.

The image is resized to multiples of ``patch_size * merge_size`` keeping its aspect ratio, with
its pixel count brought into ``[min_pixels, max_pixels]``; every ``merge_size`` x ``merge_size``
block of ``patch_size`` patches becomes one ``<|image_pad|>``. Qwen2.5-VL ships the same
processor class with the same defaults, so both model types share this adapter.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import PositiveInt

from mmstore_client.layouts.base import Layout, LayoutConfig, LayoutConfigError, Placement
from mmstore_client.layouts.common import (
    ceil_by_factor,
    floor_by_factor,
    pick,
    round_by_factor,
    thw_placement,
)
from mmstore_client.layouts.registry import register

MAX_ASPECT_RATIO = 200  # smart_resize raises above this ratio of long to short side


class Qwen2VLConfig(LayoutConfig):
    """``Qwen2VLImageProcessor`` class defaults; ``min_pixels``/``max_pixels`` are HF's
    ``size["shortest_edge"]``/``size["longest_edge"]`` (pixel counts, not edges)."""

    patch_size: PositiveInt = 14
    merge_size: PositiveInt = 2
    temporal_patch_size: PositiveInt = 2
    min_pixels: PositiveInt = 56 * 56
    max_pixels: PositiveInt = 28 * 28 * 1280


@register("qwen2_vl", "qwen2_5_vl")
class Qwen2VLLayout(Layout[Qwen2VLConfig]):
    """``grid`` is ``image_grid_thw``: ``(1, resized_height / patch, resized_width / patch)``.

    ``placeholder_text`` is ``num_tokens`` copies of ``<|image_pad|>`` (all of them counted),
    replacing the one ``<|image_pad|>`` between ``<|vision_start|>`` and ``<|vision_end|>``.
    """

    family = "qwen2_vl"
    hf_processor = "Qwen2VLImageProcessor"
    config_type = Qwen2VLConfig
    image_token = "<|image_pad|>"
    placeholder = "<|image_pad|>"
    template_text = "<|vision_start|><|image_pad|><|vision_end|>"
    other_media_tokens = ("<|video_pad|>",)

    def place(self, width: int, height: int) -> Placement:
        resized_height, resized_width = self.resize(height, width)
        return thw_placement(resized_height, resized_width, self.config.patch_size, self.config.merge_size)

    def placeholder_text(self, placement: Placement) -> str:
        return self.image_token * placement.num_tokens

    def pixel_values_elements(self, placement: Placement) -> int:
        """One row of ``3 * temporal_patch_size * patch_size**2`` per patch of the grid."""
        cfg = self.config
        return math.prod(placement.grid) * 3 * cfg.temporal_patch_size * cfg.patch_size**2

    def check_aspect_ratio(self, height: int, width: int) -> None:
        """smart_resize's first rule, on the size it sees."""
        ratio = max(height, width) / min(height, width)
        if ratio > MAX_ASPECT_RATIO:
            raise self.refuse(
                f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio} "
                f"({width}x{height})"
            )

    def resize(self, height: int, width: int) -> tuple[int, int]:
        """``smart_resize(height, width, factor, min_pixels, max_pixels)``, as (height, width)."""
        cfg = self.config
        factor = cfg.patch_size * cfg.merge_size
        self.check_aspect_ratio(height, width)
        h_bar = round_by_factor(height, factor)
        w_bar = round_by_factor(width, factor)
        if h_bar * w_bar > cfg.max_pixels:
            beta = math.sqrt((height * width) / cfg.max_pixels)
            h_bar = max(factor, floor_by_factor(height / beta, factor))
            w_bar = max(factor, floor_by_factor(width / beta, factor))
        elif h_bar * w_bar < cfg.min_pixels:
            beta = math.sqrt(cfg.min_pixels / (height * width))
            h_bar = ceil_by_factor(height * beta, factor)
            w_bar = ceil_by_factor(width * beta, factor)
        return h_bar, w_bar

    @classmethod
    def overrides_from_hf(cls, image_processor: dict[str, Any], processor: dict[str, Any]) -> dict[str, Any]:
        """``size`` (5.x) with the 4.x ``min_pixels``/``max_pixels`` keys winning over it, as in
        ``Qwen2VLImageProcessor.__init__``; a ``size`` left without both edges is refused, since
        HF then fails on every image."""
        size = image_processor.get("size")
        size = dict(size) if isinstance(size, dict) else {}
        if image_processor.get("min_pixels") is not None:
            size["shortest_edge"] = image_processor["min_pixels"]
        if image_processor.get("max_pixels") is not None:
            size["longest_edge"] = image_processor["max_pixels"]
        fields = pick(image_processor, "patch_size", "merge_size", "temporal_patch_size")
        if not size:
            return fields
        if size.get("shortest_edge") is None or size.get("longest_edge") is None:
            raise LayoutConfigError(
                f"{cls.family}: the image processor's size must hold 'shortest_edge' and "
                f"'longest_edge' (min and max pixels), got {size}"
            )
        return {**fields, "min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}
