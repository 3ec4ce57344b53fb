"""LLaVA-OneVision: anyres tiling on grid pinpoints, then unpadding, capped at ``anyres_max_N``.

The image processor picks the pinpoint resolution that keeps the most of the image
(``select_best_resolution``), tiles it into ``image_size`` squares and adds one base square of
the whole image. The token count is ``LlavaOnevisionProcessor._get_number_of_features``: the
base square's ``num_image_tokens``, plus the tile features left after removing the letterbox
padding (one newline token per remaining row), shrunk when they exceed ``N`` tiles' worth.
The exact float expressions (``round(..., 7)``, the 1.1 threshold) are those of the processor.

Only the single-image mode is mirrored, which is what the processor does for a flat list of
images (and what vLLM passes it). Nested per-sample lists with several images switch HF to a
different, tile-free count; callers must not use them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import PositiveInt, field_validator

from mmstore_client.layouts.base import Layout, LayoutConfig, LayoutConfigError, Placement
from mmstore_client.layouts.common import pick
from mmstore_client.layouts.registry import register

# LlavaOnevisionImageProcessor.image_grid_pinpoints: every (rows, cols) in 1..6 of 384 tiles.
DEFAULT_PINPOINTS = tuple((384 * rows, 384 * cols) for rows in range(1, 7) for cols in range(1, 7))


class LlavaOnevisionConfig(LayoutConfig):
    """Image processor defaults plus the processor kwargs every OneVision checkpoint saves
    (``LlavaOnevisionProcessor`` itself defaults ``num_image_tokens`` to None and then fails)."""

    image_size: PositiveInt = 384  # tile side: size["height"] (or size["shortest_edge"])
    image_grid_pinpoints: tuple[tuple[PositiveInt, PositiveInt], ...] = DEFAULT_PINPOINTS
    num_image_tokens: PositiveInt = 729  # (384 // 14) ** 2 SigLIP features per square
    vision_aspect_ratio: str = "anyres_max_9"
    vision_feature_select_strategy: Literal["default", "full"] = "full"

    @field_validator("vision_aspect_ratio")
    @classmethod
    def _anyres_max(cls, value: str) -> str:
        if not re.fullmatch(r"anyres_max_[1-9][0-9]*", value):
            raise ValueError(f"vision_aspect_ratio must look like 'anyres_max_9', got {value!r}")
        return value


@register("llava_onevision")
class LlavaOnevisionLayout(Layout[LlavaOnevisionConfig]):
    """``grid`` is ``(rows, cols)`` of ``image_size`` tiles in the chosen pinpoint resolution;
    the processor's ``pixel_values`` for the image holds ``1 + rows * cols`` squares.

    ``placeholder_text`` is ``num_tokens`` copies of ``<image>`` (all counted), replacing the
    template's one ``<image>``.
    """

    family = "llava_onevision"
    hf_processor = "LlavaOnevisionImageProcessor"
    config_type = LlavaOnevisionConfig
    image_token = "<image>"
    placeholder = "<image>"
    template_text = "<image>"

    def place(self, width: int, height: int) -> Placement:
        cfg = self.config
        best = select_best_resolution(height, width, cfg.image_grid_pinpoints)
        if best is None:
            raise self.refuse(
                f"no grid pinpoint keeps a single pixel of a {width}x{height} image "
                "(select_best_resolution finds no fit and the processor fails)"
            )
        best_height, best_width = best
        rows, cols = best_height // cfg.image_size, best_width // cfg.image_size
        side = int(math.sqrt(cfg.num_image_tokens))
        unpadded, newlines = self.unpadded_features(height, width, side * rows, side * cols)
        num_tokens = unpadded + newlines + cfg.num_image_tokens
        if cfg.vision_feature_select_strategy == "default":
            num_tokens -= 1
        return Placement(grid=(rows, cols), num_tokens=num_tokens)

    def unpadded_features(
        self, height: int, width: int, current_height: int, current_width: int
    ) -> tuple[int, int]:
        """``_get_unpadded_features``: (features, newline features) of the tile grid."""
        if width / height > current_width / current_height:
            new_height = int(round(height * (current_width / width), 7))
            current_height -= (current_height - new_height) // 2 * 2
        else:
            new_width = int(round(width * (current_height / height), 7))
            current_width -= (current_width - new_width) // 2 * 2
        unpadded, newlines = current_height * current_width, current_height
        max_tiles = int(self.config.vision_aspect_ratio.removeprefix("anyres_max_"))
        side = int(math.sqrt(self.config.num_image_tokens))
        ratio = math.sqrt(current_height * current_width / (max_tiles * side**2))
        if ratio > 1.1:
            unpadded = int(current_height // ratio) * int(current_width // ratio)
            newlines = int(current_height // ratio)
        return unpadded, newlines

    def placeholder_text(self, placement: Placement) -> str:
        return self.image_token * placement.num_tokens

    def pixel_values_elements(self, placement: Placement) -> int:
        """The base square plus one ``image_size`` square per tile of the grid."""
        rows, cols = placement.grid
        return (1 + rows * cols) * 3 * self.config.image_size**2

    @classmethod
    def overrides_from_hf(cls, image_processor: dict[str, Any], processor: dict[str, Any]) -> dict[str, Any]:
        """Tile side from ``size`` (square only; a ``crop_size`` must agree), pinpoints from the
        image processor; token settings from ``processor_config.json``."""
        fields = pick(image_processor, "image_grid_pinpoints")
        fields |= pick(processor, "num_image_tokens", "vision_aspect_ratio", "vision_feature_select_strategy")
        if "num_image_tokens" not in fields:
            raise LayoutConfigError(
                "llava_onevision: processor_config.json has no num_image_tokens, without which "
                "LlavaOnevisionProcessor fails on every image; copy it from the checkpoint"
            )
        size, crop = image_processor.get("size") or {}, image_processor.get("crop_size") or {}
        sides = {
            saved[key]
            for saved in (size, crop)
            for key in ("height", "width", "shortest_edge")
            if saved.get(key) is not None
        }
        if len(sides) > 1:
            raise LayoutConfigError(
                f"llava_onevision: only square tiles are mirrored; got size={size} crop_size={crop}"
            )
        if sides:
            fields["image_size"] = sides.pop()
        return fields


def select_best_resolution(
    height: int, width: int, pinpoints: tuple[tuple[int, int], ...]
) -> tuple[int, int] | None:
    """``transformers.image_processing_utils.select_best_resolution``: the (height, width)
    pinpoint keeping the most image pixels, then wasting the fewest; None where every pinpoint
    would keep zero pixels (a needle-thin image), as HF's loop then finds no fit."""
    best_fit = None
    max_effective, min_wasted = 0, float("inf")
    for pin_height, pin_width in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        downscaled = int(width * scale) * int(height * scale)
        effective = min(downscaled, width * height)
        wasted = pin_width * pin_height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (pin_height, pin_width)
    return best_fit
