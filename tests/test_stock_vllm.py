"""Training samples from stock vLLM's answers (``mmstore_client.stock_vllm``), end to end.

A real ``mmstore serve`` and a real stock vLLM server with the ``mmstore-vllm`` plugin (the
fixtures of ``test_vllm_plugin``: one server for this module), driven by plain HTTP on
``/inference/v1/generate`` with ``content_parts`` and by the official ``openai`` package. The
samples built from the answers are checked against our renderer, the HF processor, and the
trainer's materialization (pixels compared with the decoding rule's).
"""

from __future__ import annotations

import httpx
import pytest
import test_vllm_plugin as plugin_tests
from mmstore_client import StoreClient, decode
from mmstore_client.digest import parse_ref
from mmstore_client.placeholders import PlaceholderMismatch, collapse
from mmstore_client.render import Rendered
from mmstore_client.samples import Sample
from mmstore_client.stock_vllm import (
    TurnBreak,
    bridge_token_ids,
    content_parts,
    describe_images,
    sample_from_chat,
    sample_from_generate,
)
from mmstore_trainer import Materializer
from support import image_bytes
from test_vllm_plugin import hf_ids, one_pad_prompt, ref, user

# the plugin tests' module-scoped fixtures, bound here: one store and one vLLM server for this module
client, media_dir, model = plugin_tests.client, plugin_tests.media_dir, plugin_tests.model
plugin_store, renderer = plugin_tests.plugin_store, plugin_tests.renderer
store_client, vllm_server = plugin_tests.store_client, plugin_tests.vllm_server

pytestmark = pytest.mark.slow
TURNS = 5


@pytest.fixture(scope="module")
def plain_tokens(renderer) -> list[int]:
    """Every id but the special tokens: the policy never samples image markup or an early end."""
    special = set(renderer.tokenizer.all_special_ids)
    vocab = renderer.tokenizer.get_vocab()
    special |= {i for t, i in vocab.items() if t.startswith("<|") and t.endswith("|>")}
    return sorted(set(vocab.values()) - special)


def generate(server, token_ids, descriptors, allowed) -> dict:
    body = {
        "token_ids": token_ids,
        "content_parts": content_parts(descriptors),
        "sampling_params": {"max_tokens": 5, "temperature": 1.0, "logprobs": 0, "allowed_token_ids": allowed},
        "return_token_ids": True,
    }
    r = httpx.post(f"{server.url}/inference/v1/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def turn_images(store_client: StoreClient, turn: int) -> tuple[list[str], dict[str, bytes]]:
    """Turn k's 2k images: PNGs and JPEGs of a few sizes (plain RGB: no EXIF, no alpha)."""
    blobs = {}
    for j in range(2 * turn):
        fmt = "PNG" if j % 2 == 0 else "JPEG"
        data = image_bytes(40 + 13 * j, 30 + 7 * turn, fmt=fmt, seed=100 * turn + j)
        blobs[parse_ref(ref(store_client, data))] = data
    return list(blobs), blobs


def headers(blobs: dict[str, bytes]) -> dict:
    return {d: decode.probe(data) for d, data in blobs.items()}


@pytest.fixture(scope="module")
def conversation(vllm_server, store_client, renderer, plain_tokens):
    """Five turns through ``/inference/v1/generate``: per turn the sample, vLLM's answer, the
    renderer's ids for the same turn, and the request ids sent."""
    blobs: dict[str, bytes] = {}
    turns = []
    previous: Sample | None = None
    rendered: Rendered | None = None
    for turn in range(1, TURNS + 1):
        digests, new = turn_images(store_client, turn)
        blobs.update(new)
        message = user(f"turn {turn}: what changed?", *[f"mmstore://blobs/{d}" for d in digests])
        if previous is None:
            rendered = renderer.render([message])
            request_ids = one_pad_prompt(renderer, [message])
        else:
            rendered = renderer.bridge(rendered, [message])
            suffix = rendered.token_ids[len(previous.token_ids) :]
            runs = [
                s.model_copy(update={"start": s.start - len(previous.token_ids)})
                for s in rendered.image_spans[len(previous.descriptors) :]
            ]
            request_ids = bridge_token_ids(previous, collapse(suffix, runs))
        descriptors = describe_images(list(blobs), headers(blobs), renderer.layout)
        answer = generate(vllm_server, request_ids, descriptors, plain_tokens)
        pixels = [decode.pixel_digest(decode.decode_rgb(blobs[d.digest])) for d in descriptors]
        sample = sample_from_generate(
            answer,
            descriptors,
            image_token_id=renderer.image_token_id,
            sample_id=f"conv-t{turn}",
            previous=previous,
            turn=turn,
            pixel_digests=pixels,
        )
        turns.append({"sample": sample, "answer": answer, "rendered": rendered, "request": request_ids})
        completion = answer["choices"][0]["token_ids"]
        rendered = rendered.extend(completion, assistant=True)
        rendered.messages.append({"role": "assistant", "content": renderer.tokenizer.decode(completion)})
        previous = sample
    return turns, blobs


def test_five_turn_generate_prompts_equal_the_renderers_ids_and_extend_each_other(conversation):
    turns, _ = conversation
    for k, t in enumerate(turns, start=1):
        assert t["answer"]["prompt_token_ids"] == t["rendered"].token_ids, f"turn {k}"
        assert len(t["sample"].descriptors) == k * (k + 1)  # 2 + 4 + ... + 2k images
        if k > 1:
            before = turns[k - 2]["sample"]
            assert t["sample"].token_ids[: len(before.token_ids)] == before.token_ids
            assert t["sample"].logprobs[: len(before.logprobs)] == before.logprobs
            assert t["sample"].loss_mask[: len(before.loss_mask)] == before.loss_mask
    last = turns[-1]["sample"]
    assert sum(last.loss_mask) == sum(len(t["answer"]["choices"][0]["token_ids"]) for t in turns)


def test_first_turn_ids_equal_the_hf_processors(conversation, renderer, tiny_qwen2_vl):
    turns, blobs = conversation
    first = turns[0]["sample"]
    message = turns[0]["rendered"].messages
    images = [blobs[d.digest] for d in first.descriptors]
    expected = hf_ids(tiny_qwen2_vl, renderer, message, images)
    assert turns[0]["answer"]["prompt_token_ids"] == expected


def test_vllms_placeholder_ranges_are_the_descriptors_spans(conversation):
    turns, _ = conversation
    for t in turns:
        ranges = [(p["offset"], p["length"]) for p in t["answer"]["mm_placeholders"]["image"]]
        assert ranges == [(s.start, s.length) for s in t["sample"].image_spans]
        assert [s.length for s in t["sample"].image_spans] == [d.num_tokens for d in t["sample"].descriptors]


def test_five_turn_sample_passes_the_trainers_materialization_with_equal_pixels(
    conversation, plugin_store, tiny_qwen2_vl
):
    turns, _ = conversation
    last = turns[-1]["sample"]
    roundtrip = Sample.model_validate_json(last.model_dump_json())  # as a rollout worker writes it
    with StoreClient(plugin_store.url) as store:
        got = Materializer.from_pretrained(tiny_qwen2_vl, store, strict_pixels=True)(roundtrip)
    assert len(got.images) == len(last.descriptors) == 30
    assert got.pixels_checked == 30 and got.pixel_mismatches == 0
    assert got.token_ids.tolist() == last.token_ids
    assert got.loss_mask.tolist() == last.loss_mask


def test_a_placeholder_range_off_by_one_is_an_error_naming_the_image(conversation, renderer):
    turns, _ = conversation
    answer = {**turns[1]["answer"]}
    ranges = [dict(p) for p in answer["mm_placeholders"]["image"]]
    ranges[3]["length"] -= 1
    answer["mm_placeholders"] = {"image": ranges}
    sample = turns[1]["sample"]
    with pytest.raises(PlaceholderMismatch, match=f"image 3 \\({sample.descriptors[3].digest}\\)"):
        sample_from_generate(
            answer, sample.descriptors, image_token_id=renderer.image_token_id, sample_id="x", turn=2
        )


def test_a_descriptor_vllm_expanded_differently_is_an_error_naming_the_image(conversation, renderer):
    turns, _ = conversation
    sample = turns[0]["sample"]
    wrong = [*sample.descriptors]
    wrong[1] = wrong[1].model_copy(update={"num_tokens": wrong[1].num_tokens + 4})
    with pytest.raises(PlaceholderMismatch, match=f"image 1 \\({wrong[1].digest}\\)"):
        sample_from_generate(turns[0]["answer"], wrong, image_token_id=renderer.image_token_id, sample_id="x")


def test_a_turn_sent_without_bridging_is_an_error_naming_the_turn(
    conversation, vllm_server, renderer, plain_tokens
):
    """Re-sending turn 2's expanded ids (not collapsed): vLLM expands every run again."""
    turns, _ = conversation
    first, second = turns[0]["sample"], turns[1]["sample"]
    answer = generate(vllm_server, second.token_ids, second.descriptors, plain_tokens)
    with pytest.raises((TurnBreak, PlaceholderMismatch)):
        sample_from_generate(
            answer,
            second.descriptors,
            image_token_id=renderer.image_token_id,
            sample_id="x",
            previous=first,
            turn=2,
        )
    third = turns[2]["answer"]
    with pytest.raises(TurnBreak, match="turn 3"):  # a turn 3 answer that does not extend turn 2's sample
        sample_from_generate(
            third,
            turns[2]["sample"].descriptors,
            image_token_id=renderer.image_token_id,
            sample_id="x",
            previous=second.model_copy(
                update={"token_ids": [*second.token_ids[:-1], second.token_ids[-1] + 1]}
            ),
            turn=3,
        )


def test_chat_answer_with_refs_becomes_a_checked_sample(client, model, store_client, renderer, plain_tokens):
    digests, blobs = turn_images(store_client, 7)
    message = user("describe", *[f"mmstore://blobs/{d}" for d in digests])
    resp = client.chat.completions.create(
        model=model,
        messages=[message],
        max_tokens=4,
        logprobs=True,
        extra_body={"return_token_ids": True, "allowed_token_ids": plain_tokens},
    )
    descriptors = describe_images(digests, headers(blobs), renderer.layout)
    sample = sample_from_chat(
        resp.model_dump(), descriptors, image_token_id=renderer.image_token_id, sample_id="chat"
    )
    rendered = renderer.render([message])
    assert sample.token_ids[: len(rendered.token_ids)] == rendered.token_ids
    assert sample.image_spans == rendered.image_spans
    assert (
        sum(sample.loss_mask)
        == len(resp.choices[0].token_ids)
        == len(sample.token_ids) - len(rendered.token_ids)
    )
