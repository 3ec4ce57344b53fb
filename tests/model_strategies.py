"""Hypothesis strategies derived from pydantic models, field by field, from their annotations.

A field added to a model is drawn without anyone remembering to add it to a test: the strategy
is read off the annotation and its constraints (``Gt``/``Ge``/``Lt``/``Le``, string patterns,
literals, unions, nested models). An annotation this module cannot draw raises
:class:`NotDrawable` naming the field, so a round-trip test fails loudly instead of skipping it.

Floats are finite: JSON (the JSONL sample files, the JSON columns of Parquet) has no NaN or
infinity, and pydantic writes them as ``null``.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo


class NotDrawable(TypeError):
    """An annotation with no derived strategy: teach :func:`for_annotation` its type."""


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    bounds: dict[str, Any] = {}
    for m in metadata:
        if isinstance(m, FieldInfo):  # Annotated[int, Field(ge=0)]
            bounds |= _bounds(m.metadata)
        elif isinstance(m, at.Gt):
            bounds["gt"] = m.gt
        elif isinstance(m, at.Ge):
            bounds["ge"] = m.ge
        elif isinstance(m, at.Lt):
            bounds["lt"] = m.lt
        elif isinstance(m, at.Le):
            bounds["le"] = m.le
        elif isinstance(m, at.MinLen):
            bounds["min_len"] = m.min_length
        elif isinstance(m, at.MaxLen):
            bounds["max_len"] = m.max_length
        elif getattr(m, "pattern", None):
            bounds["pattern"] = m.pattern
    return bounds


def _ints(b: dict[str, Any]) -> st.SearchStrategy[int]:
    low = b["gt"] + 1 if "gt" in b else b.get("ge")
    high = b["lt"] - 1 if "lt" in b else b.get("le")
    return st.integers(low, high)


def _floats(b: dict[str, Any]) -> st.SearchStrategy[float]:
    return st.floats(
        min_value=b.get("gt", b.get("ge")),
        max_value=b.get("lt", b.get("le")),
        exclude_min="gt" in b,
        exclude_max="lt" in b,
        allow_nan=False,
        allow_infinity=False,
    )


def for_annotation(
    annotation: Any, metadata: list[Any] | None = None, *, where: str = ""
) -> st.SearchStrategy:
    """Values valid for ``annotation`` (with the constraints in ``metadata``)."""
    metadata = list(metadata or [])
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        inner, *extra = args
        return for_annotation(inner, [*extra, *metadata], where=where)
    b = _bounds(metadata)
    size = {"min_size": b.get("min_len", 0), "max_size": b.get("max_len", 4)}
    if annotation is type(None):
        return st.none()
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (Union, types.UnionType):
        return st.one_of([for_annotation(a, metadata, where=where) for a in args])
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return _ints(b)
    if annotation is float:
        return _floats(b)
    if annotation is str:
        if "pattern" in b:
            return st.from_regex(b["pattern"], fullmatch=True)
        return st.text(**size)
    if origin is list:
        return st.lists(for_annotation(args[0], where=f"{where}[]"), **size)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return st.lists(for_annotation(args[0], where=f"{where}[]"), **size).map(tuple)
    if origin is dict:
        keys = for_annotation(args[0], where=f"{where}.key")
        return st.dictionaries(keys, for_annotation(args[1], where=f"{where}{{}}"), max_size=size["max_size"])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return for_model(annotation)
    raise NotDrawable(
        f"{where or annotation}: no strategy for {annotation!r}; teach tests/model_strategies.py"
    )


def for_field(model: type[BaseModel], name: str) -> st.SearchStrategy:
    info: FieldInfo = model.model_fields[name]
    return for_annotation(info.annotation, info.metadata, where=f"{model.__name__}.{name}")


def element(model: type[BaseModel], name: str) -> st.SearchStrategy:
    """The elements of a list field (or of the list arm of a union), e.g. one token id."""
    info = model.model_fields[name]
    arms = get_args(info.annotation) if get_origin(info.annotation) in (Union, types.UnionType) else ()
    for candidate in (info.annotation, *arms):
        if get_origin(candidate) is list:
            return for_annotation(get_args(candidate)[0], where=f"{model.__name__}.{name}[]")
    raise NotDrawable(f"{model.__name__}.{name} is not a list: {info.annotation!r}")


def field_values(model: type[BaseModel], **overrides: st.SearchStrategy) -> st.SearchStrategy[dict]:
    """A dict with a value for EVERY field of ``model``: ``overrides`` where given, else derived."""
    unknown = overrides.keys() - model.model_fields.keys()
    if unknown:
        raise NotDrawable(f"{model.__name__} has no fields {sorted(unknown)}")
    return st.fixed_dictionaries(
        {
            name: overrides[name] if name in overrides else for_field(model, name)
            for name in model.model_fields
        }
    )


def for_model(model: type[BaseModel], **overrides: st.SearchStrategy) -> st.SearchStrategy:
    """Valid instances of ``model`` (drawn values its validators refuse are filtered out)."""

    def build(values: dict) -> Any:
        try:
            return model.model_validate(values)
        except ValueError:
            return None

    return field_values(model, **overrides).map(build).filter(lambda m: m is not None)
