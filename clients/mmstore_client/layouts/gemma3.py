"""Gemma 3: a fixed 256 soft tokens per image, plus pan-and-scan crops when it is switched on.

``Gemma3ImageProcessor`` squashes every image to one square (no size dependence), and
``Gemma3Processor`` expands each ``<start_of_image>`` to ``image_seq_length`` soft tokens framed
by ``<start_of_image>``/``<end_of_image>`` and blank lines. With pan-and-scan, an image with a
long enough side is also cut into 2 to ``pan_and_scan_max_num_crops`` crops along that side; each
crop is one more 256-token block.

Pan-and-scan is off unless the caller turns it on: ``Gemma3Processor``'s default processor
kwargs (``do_pan_and_scan=False`` and the crop settings) are passed on every call and so win over
whatever ``preprocessor_config.json`` saved. A checkpoint folder therefore never switches it on;
pass ``do_pan_and_scan=True`` as an override, exactly where vLLM's ``mm_processor_kwargs`` or a
processor call kwarg would.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import PositiveFloat, PositiveInt

from mmstore_client.layouts.base import Layout, LayoutConfig, LayoutConfigError, Placement
from mmstore_client.layouts.common import pick
from mmstore_client.layouts.registry import register


class Gemma3Config(LayoutConfig):
    """``Gemma3Processor``'s ``image_seq_length`` and default pan-and-scan kwargs."""

    image_seq_length: PositiveInt = 256
    image_size: PositiveInt = 224  # the image processor's size["height"] == size["width"] (checkpoints: 896)
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: PositiveInt = 256
    pan_and_scan_max_num_crops: PositiveInt = 4
    pan_and_scan_min_ratio_to_activate: PositiveFloat = 1.2


@register("gemma3")
class Gemma3Layout(Layout[Gemma3Config]):
    """``grid`` is ``(num_crops,)``, the processor's ``num_crops`` output (0 without
    pan-and-scan); the image is ``1 + num_crops`` squares of ``image_seq_length`` tokens.

    ``placeholder_text`` replaces the template's ``<start_of_image>`` by
    ``"\\n\\n<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>\\n\\n"`` (only the
    soft tokens count); with crops, by the processor's sentence around one such block for the
    whole image and one per crop.
    """

    family = "gemma3"
    hf_processor = "Gemma3ImageProcessor"
    config_type = Gemma3Config
    image_token = "<image_soft_token>"
    placeholder = "<start_of_image>"
    template_text = "<start_of_image>"

    def place(self, width: int, height: int) -> Placement:
        num_crops = self.num_crops(height, width) if self.config.do_pan_and_scan else 0
        return Placement(grid=(num_crops,), num_tokens=self.config.image_seq_length * (1 + num_crops))

    def num_crops(self, height: int, width: int) -> int:
        """``Gemma3ImageProcessor.pan_and_scan_batched``'s crop count for this size."""
        cfg = self.config
        if width >= height:
            if width / height < cfg.pan_and_scan_min_ratio_to_activate:
                return 0
            crops_w = math.floor(width / height + 0.5)
            crops_w = min(math.floor(width / cfg.pan_and_scan_min_crop_size), crops_w)
            crops_w = min(cfg.pan_and_scan_max_num_crops, max(2, crops_w))
            crops_h = 1
        else:
            if height / width < cfg.pan_and_scan_min_ratio_to_activate:
                return 0
            crops_h = math.floor(height / width + 0.5)
            crops_h = min(math.floor(height / cfg.pan_and_scan_min_crop_size), crops_h)
            crops_h = min(cfg.pan_and_scan_max_num_crops, max(2, crops_h))
            crops_w = 1
        crop_w = math.ceil(width / crops_w)
        crop_h = math.ceil(height / crops_h)
        if min(crop_w, crop_h) < cfg.pan_and_scan_min_crop_size:
            return 0
        return crops_h * crops_w

    def pixel_values_elements(self, placement: Placement) -> int:
        """One ``image_size`` square for the image and one per crop."""
        (num_crops,) = placement.grid
        return (1 + num_crops) * 3 * self.config.image_size**2

    def placeholder_text(self, placement: Placement) -> str:
        block = f"\n\n{self.placeholder}{self.image_token * self.config.image_seq_length}<end_of_image>\n\n"
        (num_crops,) = placement.grid
        if not num_crops:
            return block
        return (
            f"Here is the original image {block} and here are some crops to help you see better "
            + " ".join([block] * num_crops)
        )

    @classmethod
    def overrides_from_hf(cls, image_processor: dict[str, Any], processor: dict[str, Any]) -> dict[str, Any]:
        """``image_seq_length`` from ``processor_config.json`` and the square ``size``; see the
        module docstring for why the saved pan-and-scan settings never apply."""
        size = image_processor.get("size")
        if size is not None and (not isinstance(size, dict) or size.get("height") != size.get("width")):
            raise LayoutConfigError(f"{cls.family}: only a square size is mirrored, got {size}")
        return pick(processor, "image_seq_length") | ({"image_size": size["height"]} if size else {})
