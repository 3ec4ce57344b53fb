"""Kimi K2.5: ``Kimi_K25ImageProcessor``'s NaViT resize, never upscaling, then padding.

The image is shrunk (never enlarged) until it fits ``max_patches`` patches in total and
``max_patches_per_side`` patches per side, then padded up to multiples of
``patch_size * merge_size``; every ``merge_size`` x ``merge_size`` block of patches of the padded
image is one ``<|media_pad|>``.

Checkpoints saved by Moonshot's own (remote-code) processor keep these limits in
``media_proc_cfg`` (``in_patch_limit``, ``patch_limit_on_one_side``, ``merge_kernel_size``);
:meth:`KimiK25Layout.overrides_from_hf` reads either form.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import PositiveInt

from mmstore_client.layouts.base import Layout, LayoutConfig, LayoutConfigError, Placement
from mmstore_client.layouts.common import pick, thw_placement
from mmstore_client.layouts.registry import register


class KimiK25Config(LayoutConfig):
    """``Kimi_K25ImageProcessor`` class defaults; ``max_patches_per_side`` is its
    ``size["max_height"]`` (== ``size["max_width"]``), counted in patches."""

    patch_size: PositiveInt = 14
    merge_size: PositiveInt = 2
    max_patches: PositiveInt = 16384
    max_patches_per_side: PositiveInt = 512


@register("kimi_k25")
class KimiK25Layout(Layout[KimiK25Config]):
    """``grid`` is ``image_grid_thw`` ``(1, padded_height / patch, padded_width / patch)``;
    ``placeholder_text`` is ``num_tokens`` copies of ``<|media_pad|>`` (all counted)."""

    family = "kimi_k25"
    hf_processor = "Kimi_K25ImageProcessor"
    config_type = KimiK25Config
    image_token = "<|media_pad|>"
    placeholder = "<|media_pad|>"
    template_text = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"

    def place(self, width: int, height: int) -> Placement:
        cfg = self.config
        height, width = self.resize(height, width)
        factor = cfg.merge_size * cfg.patch_size
        padded_height = (factor - height % factor) % factor + height
        padded_width = (factor - width % factor) % factor + width
        return thw_placement(padded_height, padded_width, cfg.patch_size, cfg.merge_size)

    def resize(self, height: int, width: int) -> tuple[int, int]:
        """``navit_resize``'s resized (not yet padded) (height, width)."""
        cfg = self.config
        current_patches = max(1.0, height // cfg.patch_size) * max(1.0, width // cfg.patch_size)
        side = cfg.max_patches_per_side * cfg.patch_size
        scale = min(1.0, math.sqrt(cfg.max_patches / current_patches), side / height, side / width)
        new_height = min(max(1, int(height * scale)), side)
        new_width = min(max(1, int(width * scale)), side)
        return new_height, new_width

    def placeholder_text(self, placement: Placement) -> str:
        return self.image_token * placement.num_tokens

    def pixel_values_elements(self, placement: Placement) -> int:
        """One ``3 x patch_size x patch_size`` patch per cell of the grid (no temporal patch)."""
        return math.prod(placement.grid) * 3 * self.config.patch_size**2

    @classmethod
    def overrides_from_hf(cls, image_processor: dict[str, Any], processor: dict[str, Any]) -> dict[str, Any]:
        """transformers' keys (patch and merge size, ``max_patches``, ``size`` with equal max
        height and width, as the processor demands), or the Moonshot release's ``media_proc_cfg``
        (what vLLM reads), whose limits are the same numbers under other names."""
        media = image_processor.get("media_proc_cfg")
        if isinstance(media, dict):
            return cls._from_media_proc_cfg(media)
        fields = pick(image_processor, "patch_size", "merge_size", "max_patches")
        size = image_processor.get("size")
        if size is not None:
            side = size.get("max_height")
            if side is None or side != size.get("max_width"):
                raise LayoutConfigError(
                    f"{cls.family}: size must hold equal 'max_height' and 'max_width', got {size}"
                )
            fields["max_patches_per_side"] = side
        return fields

    @classmethod
    def _from_media_proc_cfg(cls, media: dict[str, Any]) -> dict[str, Any]:
        if media.get("fixed_output_tokens") is not None:
            raise LayoutConfigError(f"{cls.family}: media_proc_cfg.fixed_output_tokens is not mirrored")
        fields = pick(media, "patch_size")
        merge = media.get("merge_kernel_size")
        if isinstance(merge, list):
            if len(set(merge)) != 1:
                raise LayoutConfigError(
                    f"{cls.family}: only a square merge_kernel_size is mirrored, got {merge}"
                )
            merge = merge[0]
        if merge is not None:
            fields["merge_size"] = merge
        renamed = {"in_patch_limit": "max_patches", "patch_limit_on_one_side": "max_patches_per_side"}
        return fields | {field: media[key] for key, field in renamed.items() if media.get(key) is not None}
