"""Idefics3 and SmolVLM: resize the longest edge, then split into square tiles plus a global view.

``Idefics3ImageProcessor`` (``SmolVLMImageProcessor`` is a copy of it) resizes the image so its
longest edge is ``longest_edge`` (up or down, keeping the other edge even), clamps it below 4096,
then ``resize_for_vision_encoder`` rounds both edges up to multiples of ``max_image_size`` and
cuts ``rows`` x ``cols`` tiles of that size. Each tile and the global image cost
``image_seq_len`` ``<image>`` tokens; an image that fits one tile is not split (0 x 0).

The sizing mirrors the processing path (``resize`` then ``resize_for_vision_encoder``), not the
processor's shortcut ``get_number_of_image_patches``, which rounds the short edge from the
unscaled size and so can disagree with what the pipeline does.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import PositiveInt

from mmstore_client.layouts.base import Layout, LayoutConfig, LayoutConfigError, Placement
from mmstore_client.layouts.common import pick
from mmstore_client.layouts.registry import register

MAX_IMAGE_SIZE = 4096  # the processor module's hard cap on either edge after the first resize


class Idefics3Config(LayoutConfig):
    """``Idefics3ImageProcessor`` class defaults and ``Idefics3Processor``'s ``image_seq_len``."""

    longest_edge: PositiveInt = 4 * 364  # size["longest_edge"]
    max_image_size: PositiveInt = 364  # max_image_size["longest_edge"]: the tile side
    do_image_splitting: bool = True
    image_seq_len: PositiveInt = 169


@register("idefics3", "smolvlm")
class Idefics3Layout(Layout[Idefics3Config]):
    """``grid`` is ``(rows, cols)`` of tiles, the processor's ``rows``/``cols`` outputs
    (``(0, 0)``: the image is not split).

    ``placeholder_text`` replaces the template's ``<image>`` by, per tile row,
    ``<fake_token_around_image><row_r_col_c>`` + ``<image>`` * ``image_seq_len`` for each tile and
    a ``\\n``; then ``\\n<fake_token_around_image><global-img>`` + ``<image>`` * ``image_seq_len``
    + ``<fake_token_around_image>`` (without the leading ``\\n`` for an unsplit image). Only the
    ``<image>`` tokens count: ``image_seq_len * (rows * cols + 1)``.
    """

    family = "idefics3"
    hf_processor = "Idefics3ImageProcessor"
    config_type = Idefics3Config
    image_token = "<image>"
    placeholder = "<image>"
    template_text = "<image>"

    def place(self, width: int, height: int) -> Placement:
        rows, cols = self.tiles(height, width)
        return Placement(grid=(rows, cols), num_tokens=self.config.image_seq_len * (rows * cols + 1))

    def tiles(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of ``max_image_size`` tiles for an image of this size."""
        cfg = self.config
        height, width = _rescale_to_max_len(height, width, cfg.longest_edge)
        height, width = _scale_below_upper_bound(height, width, MAX_IMAGE_SIZE)
        if not cfg.do_image_splitting:
            return 0, 0
        tile = cfg.max_image_size
        aspect_ratio = width / height
        if width >= height:
            width = math.ceil(width / tile) * tile
            height = math.ceil(int(width / aspect_ratio) / tile) * tile
        else:
            height = math.ceil(height / tile) * tile
            width = math.ceil(int(height * aspect_ratio) / tile) * tile
        if height > tile or width > tile:
            return math.ceil(height / tile), math.ceil(width / tile)
        return 0, 0

    def pixel_values_elements(self, placement: Placement) -> int:
        """One ``max_image_size`` square per tile plus the global view."""
        rows, cols = placement.grid
        return (rows * cols + 1) * 3 * self.config.max_image_size**2

    def placeholder_text(self, placement: Placement) -> str:
        rows, cols = placement.grid
        tile_tokens = self.image_token * self.config.image_seq_len
        global_view = f"<fake_token_around_image><global-img>{tile_tokens}<fake_token_around_image>"
        if not rows and not cols:
            return global_view
        text = "".join(
            "".join(
                f"<fake_token_around_image><row_{row}_col_{col}>{tile_tokens}" for col in range(1, cols + 1)
            )
            + "\n"
            for row in range(1, rows + 1)
        )
        return f"{text}\n{global_view}"

    @classmethod
    def overrides_from_hf(cls, image_processor: dict[str, Any], processor: dict[str, Any]) -> dict[str, Any]:
        """``size``/``max_image_size`` by ``longest_edge`` (the only resize mode mirrored),
        ``do_image_splitting``, and ``image_seq_len`` from ``processor_config.json``."""
        if image_processor.get("do_resize") is False:
            raise LayoutConfigError(f"{cls.family}: do_resize=False is not mirrored")
        fields = pick(image_processor, "do_image_splitting") | pick(processor, "image_seq_len")
        for key, field in (("size", "longest_edge"), ("max_image_size", "max_image_size")):
            saved = image_processor.get(key)
            if saved is None:
                continue
            if not isinstance(saved, dict) or saved.get("longest_edge") is None:
                raise LayoutConfigError(
                    f"{cls.family}: only {key}={{'longest_edge': n}} is mirrored, got {saved}"
                )
            fields[field] = saved["longest_edge"]
        return fields


def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    """``_resize_output_size_rescale_to_max_len`` (min_len 1): longest edge to ``max_len``,
    the other edge made even."""
    aspect_ratio = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect_ratio)
        height += height % 2
    else:
        height = max_len
        width = int(height * aspect_ratio)
        width += width % 2
    return max(height, 1), max(width, 1)


def _scale_below_upper_bound(height: int, width: int, max_len: int) -> tuple[int, int]:
    """``_resize_output_size_scale_below_upper_bound``: shrink so no edge exceeds ``max_len``."""
    aspect_ratio = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect_ratio)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)
