"""The renderer against the real HF processor of tiny Qwen2-VL / Qwen3-VL checkpoints."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mmstore_client import compute_digest, decode, make_ref
from mmstore_client.descriptor import ProcessedPayloadError
from mmstore_client.render import Renderer, RenderError
from support import FetchingRenderer, ImageSet, image_bytes

SIZES = [(100, 140), (300, 200), (56, 56), (1280, 720), (33, 517), (640, 480)]


class Images(ImageSet):
    """digest -> bytes, standing in for the store."""

    def add(self, w: int, h: int, seed: int, fmt: str = "PNG") -> str:
        data = image_bytes(w, h, fmt, seed)
        self[compute_digest(data)] = data
        return make_ref(compute_digest(data))


def img(ref: str) -> dict:
    return {"type": "image_url", "image_url": {"url": ref}}


def hf_reference(model_dir, messages, images: Images, **template_options):
    """What HF's processor produces from the decoded images (the oracle); ``template_options``
    (``tools=``, ``add_vision_id=``, ...) go to ``apply_chat_template``."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    hf_messages = [
        {**m, "content": [{"type": "image"} if "image_url" in p else p for p in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]
    text = processor.apply_chat_template(
        hf_messages, tokenize=False, add_generation_prompt=True, **template_options
    )
    refs = [
        p["image_url"]["url"]
        for m in messages
        if isinstance(m["content"], list)
        for p in m["content"]
        if "image_url" in p
    ]
    pil = [decode.decode_rgb(images[r.split("/")[-1]]) for r in refs] or None
    out = processor(text=[text], images=pil, return_tensors="pt")
    grids = out["image_grid_thw"].tolist() if pil else []
    return out["input_ids"][0].tolist(), grids


@pytest.fixture(params=["qwen2_vl", "qwen3_vl"])
def model_dir(request):
    return request.getfixturevalue(f"tiny_{request.param}")


def conversation(images: Images, seed: int = 0) -> list[dict]:
    refs = [images.add(w, h, seed * 10 + i) for i, (w, h) in enumerate(SIZES)]
    return [
        {"role": "system", "content": "You look at pictures."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, img(refs[0])]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": [img(refs[1]), img(refs[2]), {"type": "text", "text": "and these two?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two circles."}]},
        {
            "role": "user",
            "content": [img(refs[3]), {"type": "text", "text": "count"}, img(refs[4]), img(refs[5])],
        },
    ]


def test_single_image_parity(model_dir):
    images = Images()
    messages = [
        {"role": "user", "content": [img(images.add(100, 140, 1)), {"type": "text", "text": "Describe."}]}
    ]
    renderer = FetchingRenderer(Renderer.from_pretrained(model_dir), images)
    out = renderer.render(messages)
    ids, grids = hf_reference(model_dir, messages, images)
    assert out.token_ids == ids
    assert [list(d.grid) for d in out.descriptors] == grids
    assert [d.num_tokens for d in out.descriptors] == [s.length for s in out.image_spans]
    for span in out.image_spans:
        assert set(out.token_ids[span.start : span.start + span.length]) == {renderer.image_token_id}


def test_multi_image_multi_turn_parity_and_mask(model_dir):
    images = Images()
    messages = conversation(images)
    renderer = FetchingRenderer(Renderer.from_pretrained(model_dir), images)
    out = renderer.render(messages)
    ids, grids = hf_reference(model_dir, messages, images)
    assert out.token_ids == ids
    assert [list(d.grid) for d in out.descriptors] == grids
    assert len(out.descriptors) == len(SIZES)
    masked = renderer.tokenizer.decode(
        [t for t, m in zip(out.token_ids, out.assistant_mask, strict=True) if m]
    )
    assert masked == "A red square.<|im_end|>Two circles.<|im_end|>"
    assert all(d.fingerprint == renderer.layout.fingerprint for d in out.descriptors)


def test_compact_tokenization_renders_exactly_what_expanding_every_image_does(model_dir):
    """The fast path (tokenize one placeholder per image, repeat it) against tokenizing the text
    with every image expanded, for the ids, the image spans and the assistant mask."""
    images = Images()
    messages = conversation(images)
    renderer = Renderer.from_pretrained(model_dir)
    headers = images.image_headers(images)
    fast = renderer.render(messages, headers)
    assert renderer._expands_by_repeat(fast.descriptors)  # Qwen2-VL / Qwen3-VL: pads only
    renderer._placeholder_atomic = False  # forces the expansion of every image's text
    exact = renderer.render(messages, headers)
    assert fast.token_ids == exact.token_ids
    assert fast.image_spans == exact.image_spans
    assert fast.assistant_mask == exact.assistant_mask


def test_pieces_render_what_tokenizing_the_whole_text_does(model_dir):
    """Tokenizing the text between chat markup tokens piece by piece (each piece kept) against the
    tokenizer on the whole text, for a first render and for one from kept pieces."""
    images = Images()
    messages = conversation(images)
    renderer = Renderer.from_pretrained(model_dir)
    headers = images.image_headers(images)
    assert renderer._pieces is not None  # the tiny models' tokenizers split their markup out
    first, again = renderer.render(messages, headers), renderer.render(messages, headers)
    assert renderer._pieces.kept.hits > 0
    renderer._pieces = None
    whole = renderer.render(messages, headers)
    for out in (first, again):
        assert (out.token_ids, out.image_spans, out.assistant_mask) == (
            whole.token_ids,
            whole.image_spans,
            whole.assistant_mask,
        )


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12) | st.sampled_from(
    [" ", "\n\n", "  x", "e\u0301", "\u00e9", "assistant\n", "12 345", "<|im", "_start|>", "\t"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_pieces_tokenize_any_text_as_the_tokenizer_does(tiny_qwen2_vl, data):
    tokenizer, pieces = _pieces_of(tiny_qwen2_vl)
    markup = st.sampled_from([t.content for t in tokenizer.added_tokens_decoder.values()])
    parts = data.draw(st.lists(_TEXT | markup, max_size=12))
    text = "".join(parts)
    expected = tokenizer.encode(text, add_special_tokens=False)
    assert pieces.encode(text) == expected
    assert pieces.encode(text) == expected  # from kept pieces


@functools.cache
def _pieces_of(model_dir):
    """A model's tokenizer and its pieces, built once for all examples (the kept pieces too)."""
    from mmstore_client.render import _PieceTokens

    tokenizer = Renderer.from_pretrained(model_dir).tokenizer
    pieces = _PieceTokens.of(tokenizer)
    assert pieces is not None
    return tokenizer, pieces


def test_a_tokenizer_that_strips_around_markup_is_tokenized_whole(tiny_qwen2_vl):
    """An added token that takes the whitespace beside it: pieces would tokenize that whitespace,
    the tokenizer does not; the renderer tokenizes the whole text then, and stays exact."""
    from mmstore_client.render import _PieceTokens
    from transformers import AddedToken, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2_vl))
    assert _PieceTokens.of(tokenizer) is not None
    tokenizer.add_tokens([AddedToken("<tool>", lstrip=True, rstrip=True)])
    assert _PieceTokens.of(tokenizer) is None


def test_bridging_keeps_sampled_ids_and_descriptors(tiny_qwen2_vl):
    images = Images()
    messages = conversation(images)
    renderer = FetchingRenderer(Renderer.from_pretrained(tiny_qwen2_vl), images)
    turn1 = renderer.render(messages[:2])
    # a sampled completion tokenized differently from how the tokenizer would encode its text
    tok = renderer.tokenizer
    sampled = [
        *tok.encode("A", add_special_tokens=False),
        *tok.encode(" red", add_special_tokens=False),
        *[tok.convert_tokens_to_ids(c) for c in ["Ġ", "s", "q"]],
        *tok.encode("uare.", add_special_tokens=False),
        renderer.eos_token_id,
    ]
    after = turn1.extend(sampled, assistant=True)
    after.messages.append({"role": "assistant", "content": tok.decode(sampled[:-1])})
    turn2 = renderer.bridge(after, messages[3:4])
    assert turn2.token_ids[: len(after.token_ids)] == after.token_ids, "turn k+1 starts with turn k's ids"
    assert turn2.descriptors[:1] == turn1.descriptors and len(turn2.descriptors) == 3
    assert turn2.image_spans[0] == turn1.image_spans[0]
    # the bridged suffix equals a fresh rendering's suffix: same text, same images, same ids
    fresh = renderer.render(
        [*messages[:2], {"role": "assistant", "content": tok.decode(sampled[:-1])}, messages[3]]
    )
    full_prev = renderer.render(
        [*messages[:2], {"role": "assistant", "content": tok.decode(sampled[:-1])}],
        add_generation_prompt=False,
    )
    cut = full_prev.token_ids.index(renderer.eos_token_id, len(turn1.token_ids)) + 1
    assert turn2.token_ids[len(after.token_ids) :] == fresh.token_ids[cut:]
    assert turn2.assistant_mask[len(turn1.token_ids) : len(after.token_ids)] == [True] * len(sampled)
    # a truncated completion (no end token) gets the end token from the template
    cut_short = turn1.extend(sampled[:3], assistant=True)
    cut_short.messages.append({"role": "assistant", "content": tok.decode(sampled[:3])})
    bridged = renderer.bridge(cut_short, messages[3:4])
    assert bridged.token_ids[len(cut_short.token_ids)] == renderer.eos_token_id


def test_image_tokens_in_text_refused(tiny_qwen2_vl):
    images = Images()
    renderer = FetchingRenderer(Renderer.from_pretrained(tiny_qwen2_vl), images)
    messages = [
        {
            "role": "user",
            "content": [img(images.add(64, 64, 2)), {"type": "text", "text": "hi <|image_pad|>"}],
        }
    ]
    with pytest.raises(RenderError) as exc:
        renderer.render(messages)
    assert exc.value.code == "placeholder_mismatch"
    with pytest.raises(ProcessedPayloadError):
        renderer.render([{"role": "user", "content": [img("data:image/png;base64,AAAA")]}])
    with pytest.raises(RenderError) as exc:
        renderer.render([{"role": "user", "content": [img("/tmp/local.png")]}])
    assert exc.value.code == "not_a_ref"


def test_long_plain_text_renders_and_base64_images_do_not(tiny_qwen2_vl):
    import base64

    images = Images()
    renderer = FetchingRenderer(Renderer.from_pretrained(tiny_qwen2_vl), images)
    listing = "\n".join(f"{i:08x}  {i * 2654435761 % 2**32:08x}" for i in range(400))  # 7,599 chars, hex
    messages = [
        {"role": "user", "content": [img(images.add(64, 64, 5)), {"type": "text", "text": "list it"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "tool", "content": listing},
    ]
    rendered = renderer.render(messages)
    assert renderer.tokenizer.decode(rendered.token_ids).count(listing) == 1
    b64 = base64.b64encode(image_bytes(40, 40, "JPEG", seed=4)).decode()
    with pytest.raises(ProcessedPayloadError, match="JPEG"):
        renderer.render([*messages, {"role": "tool", "content": b64}])
