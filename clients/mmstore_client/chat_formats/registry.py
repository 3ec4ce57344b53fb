"""The table from HF ``model_type`` to chat format, keyed as the layouts are."""

from __future__ import annotations

from collections.abc import Callable

from .base import ChatFormat

_FORMATS: dict[str, type[ChatFormat]] = {}


def register(*model_types: str) -> Callable[[type[ChatFormat]], type[ChatFormat]]:
    """Class decorator: ``cls`` parses the tool calls of each of these HF model types."""

    def add(cls: type[ChatFormat]) -> type[ChatFormat]:
        if taken := [t for t in model_types if t in _FORMATS]:
            raise TypeError(f"{cls.__name__}: model types already registered: {', '.join(taken)}")
        _FORMATS.update(dict.fromkeys(model_types, cls))
        return cls

    return add


def chat_format(model_type: str) -> ChatFormat | None:
    """The chat format of a model type; None where no template of that type defines tool calls."""
    cls = _FORMATS.get(model_type)
    return cls() if cls else None


def known_model_types() -> list[str]:
    return sorted(_FORMATS)
