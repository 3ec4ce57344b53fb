"""Trainer families: all model-specific knowledge of the trainer, one module per family.

Importing this package imports every family module, which registers its class in
:mod:`mmstore_trainer.families.base`'s table (keyed by layout family).
"""

from typing import Any

from mmstore_trainer.families.base import (
    Family,
    ImageFeatures,
    UnsupportedFamily,
    family_class,
    known_families,
    register,
)
from mmstore_trainer.families.qwen_vl import QwenVLFamily


def family_for(layout_family: str, image_processor: Any) -> Family:
    """The trainer family of a layout family, built on the checkpoint's image processor."""
    return family_class(layout_family)(image_processor)


__all__ = [
    "Family",
    "ImageFeatures",
    "QwenVLFamily",
    "UnsupportedFamily",
    "family_class",
    "family_for",
    "known_families",
    "register",
]
