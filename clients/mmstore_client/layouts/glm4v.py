"""GLM-4.1V, GLM-4.5V and GLM-4.6V: ``Glm4vImageProcessor``, Qwen2-VL's scheme with two twists.

``Glm4vImageProcessor``'s own ``smart_resize`` (1) first scales a side shorter than the factor up
to the factor (truncating with ``int``) and checks the aspect ratio on that upscaled size;
(2) counts pixels over ``temporal_patch_size`` frames (an image is resized as a 2-frame clip),
which halves the pixel budget of one image.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import PositiveInt

from mmstore_client.layouts.common import ceil_by_factor, floor_by_factor, round_by_factor
from mmstore_client.layouts.qwen2_vl import Qwen2VLConfig, Qwen2VLLayout
from mmstore_client.layouts.registry import register


class Glm4vConfig(Qwen2VLConfig):
    """``Glm4vImageProcessor`` class defaults (``size`` 112x112 to 28*28*15000 pixels)."""

    min_pixels: PositiveInt = 112 * 112
    max_pixels: PositiveInt = 28 * 28 * 15000


@register("glm4v", "glm4v_moe", "glm46v")
class Glm4vLayout(Qwen2VLLayout):
    """``grid`` is ``image_grid_thw`` ``(1, h / patch, w / patch)``; ``placeholder_text`` is
    ``num_tokens`` copies of ``<|image|>``, between ``<|begin_of_image|>`` and
    ``<|end_of_image|>`` in the template."""

    family = "glm4v"
    hf_processor = "Glm4vImageProcessor"
    config_type = Glm4vConfig
    image_token = "<|image|>"
    placeholder = "<|image|>"
    template_text = "<|begin_of_image|><|image|><|end_of_image|>"
    other_media_tokens = ("<|begin_of_video|>", "<|video|>", "<|end_of_video|>")

    def resize(self, height: int, width: int) -> tuple[int, int]:
        """GLM's ``smart_resize(num_frames=temporal_patch_size, ...)``, as (height, width)."""
        cfg = self.config
        factor = cfg.patch_size * cfg.merge_size
        # The processor passes num_frames == temporal_factor, so HF's t_bar equals frames.
        frames = cfg.temporal_patch_size
        if height < factor or width < factor:
            scale = max(factor / height, factor / width)
            height = int(height * scale)
            width = int(width * scale)
        self.check_aspect_ratio(height, width)
        h_bar = round_by_factor(height, factor)
        w_bar = round_by_factor(width, factor)
        if frames * h_bar * w_bar > cfg.max_pixels:
            beta = math.sqrt((frames * height * width) / cfg.max_pixels)
            h_bar = max(factor, floor_by_factor(height / beta, factor))
            w_bar = max(factor, floor_by_factor(width / beta, factor))
        elif frames * h_bar * w_bar < cfg.min_pixels:
            beta = math.sqrt(cfg.min_pixels / (frames * height * width))
            h_bar = ceil_by_factor(height * beta, factor)
            w_bar = ceil_by_factor(width * beta, factor)
        return h_bar, w_bar

    @classmethod
    def overrides_from_hf(cls, image_processor: dict[str, Any], processor: dict[str, Any]) -> dict[str, Any]:
        """As Qwen2-VL, but only ``size`` counts: ``Glm4vImageProcessor`` has no 4.x
        ``min_pixels``/``max_pixels`` kwargs and ignores them."""
        ignored = ("min_pixels", "max_pixels")
        kept = {key: value for key, value in image_processor.items() if key not in ignored}
        return super().overrides_from_hf(kept, processor)
