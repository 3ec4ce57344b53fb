"""The public surface of the packages others import: exported names and the sync/async twins.

Modelled on httpx's ``tests/test_exported_members.py``: every public name a package binds is in its
sorted ``__all__`` and nothing else is, so a new helper cannot leak into the surface unnoticed and an
export cannot point at nothing. The twins (``StoreClient``/``AsyncStoreClient``,
``InferenceClient``/``AsyncInferenceClient``) are written out by hand as httpx's are: the test keeps
their public methods and parameters in step.
"""

from __future__ import annotations

import inspect
import types

import mmstore_client
import mmstore_trainer
import pytest
from mmstore_client.inference import AsyncInferenceClient, InferenceClient
from mmstore_client.store import AsyncStoreClient, StoreClient


@pytest.mark.parametrize("package", [mmstore_client, mmstore_trainer], ids=lambda p: p.__name__)
def test_all_is_sorted_and_exactly_the_public_names(package):
    public = {
        name
        for name, value in vars(package).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert package.__all__ == sorted(package.__all__)
    assert set(package.__all__) == public


def _public_methods(cls) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


@pytest.mark.parametrize(
    ("sync_cls", "async_cls"),
    [(StoreClient, AsyncStoreClient), (InferenceClient, AsyncInferenceClient)],
    ids=["store", "inference"],
)
def test_sync_and_async_twins_have_the_same_methods_and_parameters(sync_cls, async_cls):
    sync_methods, async_methods = _public_methods(sync_cls), _public_methods(async_cls)
    assert set(sync_methods) == set(async_methods)
    for name, signature in sync_methods.items():
        assert list(signature.parameters) == list(async_methods[name].parameters), name
    for name, member in vars(async_cls).items():
        if inspect.isfunction(member) and not name.startswith("_"):
            is_async = inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member)
            assert is_async, f"{async_cls.__name__}.{name} does I/O and must be awaited"
