"""Sizing arithmetic shared by several families, written once.

Every helper repeats the exact float expression of the HF processors (``round(x / f) * f``,
not an integer shortcut): a rounding difference of one pixel changes the grid, so "equivalent"
arithmetic is not good enough. Python's ``round`` rounds half to even, as HF's does.
"""

from __future__ import annotations

import math
from typing import Any

from mmstore_client.layouts.base import Placement


def pick(saved: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The ``keys`` a saved HF config sets; a missing key or JSON ``null`` keeps the default,
    as HF falls back to its class attribute for ``None``."""
    return {key: saved[key] for key in keys if saved.get(key) is not None}


def round_by_factor(number: float, factor: int) -> int:
    """The multiple of ``factor`` nearest to ``number`` (ties to even, like HF)."""
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    """The smallest multiple of ``factor`` at or above ``number``."""
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    """The largest multiple of ``factor`` at or below ``number``."""
    return math.floor(number / factor) * factor


def thw_placement(height: int, width: int, patch_size: int, merge_size: int) -> Placement:
    """Placement of one image resized to ``height`` x ``width`` pixels in a patch-merging ViT.

    ``grid`` is HF's ``image_grid_thw`` row ``(1, height / patch, width / patch)`` (an image is
    one temporal step); each ``merge_size`` x ``merge_size`` block of patches is one token.
    """
    grid_h, grid_w = height // patch_size, width // patch_size
    return Placement((1, grid_h, grid_w), grid_h * grid_w // (merge_size * merge_size))
