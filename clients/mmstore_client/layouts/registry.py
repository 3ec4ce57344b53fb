"""The one table from HF ``model_type`` to layout adapter, and the checkpoint reader.

Adapters add themselves with the :func:`register` class decorator, listing every ``model_type``
(from ``config.json``) whose processor they mirror; the table refuses a model type claimed twice.
Importing :mod:`mmstore_client.layouts` imports every family module, so the table is complete
before any lookup.

:func:`from_pretrained` reads a checkpoint folder the way transformers does: ``config.json`` for
the model type; the image processor's saved kwargs from the ``image_processor`` entry of
``processor_config.json`` when present, else from ``preprocessor_config.json``; the processor's
own kwargs (token counts such as ``image_seq_len``) from the top level of
``processor_config.json``. Nothing is downloaded: the folder must hold these files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mmstore_client.layouts.base import Layout, LayoutConfigError

_LAYOUTS: dict[str, type[Layout]] = {}


def register(*model_types: str) -> Callable[[type[Layout]], type[Layout]]:
    """Class decorator: ``cls`` mirrors the processor of each of these HF model types."""

    def add(cls: type[Layout]) -> type[Layout]:
        if cls.family not in model_types:
            raise TypeError(f"{cls.__name__}.family {cls.family!r} must be one of {model_types}")
        taken = [f"{t!r} ({_LAYOUTS[t].__name__})" for t in model_types if t in _LAYOUTS]
        if taken:
            raise TypeError(f"{cls.__name__}: model types already registered: {', '.join(taken)}")
        _LAYOUTS.update(dict.fromkeys(model_types, cls))
        return cls

    return add


def known_model_types() -> list[str]:
    """Every HF model type with a layout, sorted."""
    return sorted(_LAYOUTS)


def layout_class(model_type: str) -> type[Layout]:
    """The adapter for an HF model type (a family name is one of its model types)."""
    try:
        return _LAYOUTS[model_type]
    except KeyError:
        raise LayoutConfigError(
            f"no image layout for model type {model_type!r}; known: {', '.join(known_model_types())}"
        ) from None


def _build(cls: type[Layout], fields: dict[str, Any]) -> Layout:
    try:
        return cls(cls.config_type(**fields))
    except ValidationError as exc:
        raise LayoutConfigError(f"invalid {cls.family} layout config: {exc}") from exc


def from_config(family: str, **overrides: Any) -> Layout:
    """The layout of a family or model type, its config defaults replaced by ``overrides``."""
    return _build(layout_class(family), overrides)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LayoutConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise LayoutConfigError(f"{path} does not hold a JSON object")
    return data


def from_pretrained(model_dir: str | Path, **overrides: Any) -> Layout:
    """The layout of a checkpoint folder.

    ``overrides`` are config fields set on top of the checkpoint's values, the way processor call
    kwargs (vLLM's ``mm_processor_kwargs``) override the saved ones.
    """
    folder = Path(model_dir)
    model_config = _read_json(folder / "config.json")
    if model_config is None or not isinstance(model_config.get("model_type"), str):
        raise LayoutConfigError(f"{folder} has no config.json with a model_type")
    cls = layout_class(model_config["model_type"])
    processor = _read_json(folder / "processor_config.json") or {}
    image_processor = processor.get("image_processor")
    if not isinstance(image_processor, dict):
        image_processor = _read_json(folder / "preprocessor_config.json")
    if image_processor is None:
        raise LayoutConfigError(
            f"{folder} has neither preprocessor_config.json nor an image_processor entry in "
            "processor_config.json; copy them from the checkpoint"
        )
    fields = cls.overrides_from_hf(image_processor, processor)
    return _build(cls, {**fields, **overrides})
