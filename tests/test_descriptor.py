"""Descriptor and sample schemas: strict, lossless, and closed to processed payloads."""

from __future__ import annotations

import base64
import json
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mmstore_client.descriptor import (
    IMAGE_KEYS,
    PROCESSED_KEYS,
    Descriptor,
    ImageSpan,
    ProcessedPayloadError,
    reject_processed,
)
from mmstore_client.digest import REF_PREFIX, compute_digest
from mmstore_client.samples import Sample
from pydantic import ValidationError
from support import image_bytes

DIGEST = compute_digest(b"an image")


def descriptor(**kw) -> Descriptor:
    base = dict(
        digest=DIGEST,
        mime="image/png",
        width=100,
        height=140,
        family="qwen2_vl",
        layout={"patch_size": 14, "merge_size": 2, "min_pixels": 3136, "max_pixels": 50176},
        fingerprint="0123456789abcdef",
        grid=(1, 10, 8),
        num_tokens=20,
    )
    return Descriptor(**(base | kw))


def test_json_roundtrip_lossless():
    d = descriptor()
    again = Descriptor.model_validate_json(d.model_dump_json())
    assert again == d and again.grid == (1, 10, 8)
    assert len(d.model_dump_json()) < 400
    assert d.ref == f"mmstore://blobs/{DIGEST}"


def test_unknown_fields_and_bad_values_rejected():
    with pytest.raises(ValidationError, match="extra"):
        Descriptor.model_validate(descriptor().model_dump() | {"colour": "red"})
    with pytest.raises(ValidationError):
        descriptor(digest="sha256:" + "0" * 64)
    with pytest.raises(ValidationError):
        descriptor(version=2)
    with pytest.raises(ValidationError):
        descriptor(num_tokens=0)


@pytest.mark.parametrize(
    "payload,path",
    [
        ({"pixel_values": [[0.1]]}, "$.meta.pixel_values"),
        ({"x": {"image_embeds": 1}}, "$.meta.x.image_embeds"),
        ({"x": [1, {"image_features": []}]}, "$.meta.x[1].image_features"),
        ({"x": "data:image/png;base64,iVBORw0KGgo="}, "$.meta.x"),
        ({"x": base64.b64encode(image_bytes(8, 8)).decode()}, "$.meta.x"),
    ],
)
def test_processed_payloads_rejected_with_path(payload, path):
    with pytest.raises(ProcessedPayloadError) as exc:
        reject_processed({"meta": payload})
    assert exc.value.path == path and path in str(exc.value)


def test_arrays_and_tensors_rejected():
    with pytest.raises(ProcessedPayloadError, match="ndarray"):
        reject_processed({"images": [np.zeros((2, 2))]})
    torch = pytest.importorskip("torch")
    with pytest.raises(ProcessedPayloadError, match="Tensor"):
        reject_processed([{"content": torch.zeros(3)}])


def test_descriptor_refuses_processed_payload_inside():
    data = descriptor().model_dump() | {"pixel_values": [1.0]}
    with pytest.raises(ValidationError, match="processed image payload"):
        Descriptor.model_validate(data)


def sample(**kw) -> Sample:
    base = dict(
        sample_id="s0",
        token_ids=list(range(30)),
        loss_mask=[False] * 25 + [True] * 5,
        advantages=0.5,
        logprobs=[0.0] * 30,
        descriptors=[descriptor()],
        image_spans=[ImageSpan(start=3, length=20)],
    )
    return Sample(**(base | kw))


def test_sample_checks_lengths_and_spans():
    s = sample()
    assert Sample.model_validate_json(s.model_dump_json()) == s
    with pytest.raises(ValidationError, match="loss_mask"):
        sample(loss_mask=[True])
    with pytest.raises(ValidationError, match="descriptor says 20"):
        sample(image_spans=[ImageSpan(start=3, length=19)])
    with pytest.raises(ValidationError, match="leaves the sequence"):
        sample(image_spans=[ImageSpan(start=20, length=20)])
    with pytest.raises(ValidationError, match="loss_mask is set on image"):
        sample(loss_mask=[True] * 30)
    with pytest.raises(ValidationError, match="processed image payload"):
        Sample.model_validate(s.model_dump() | {"meta": {"pixel_values": 1}})


def test_every_layout_config_fits_a_descriptor():
    from mmstore_client.layouts import from_config, known_model_types

    for model_type in known_model_types():
        try:
            layout = from_config(model_type)
        except Exception:
            layout = from_config(model_type, num_image_tokens=729)  # LLaVA-OneVision needs it
        placement = layout.place(640, 480)
        d = descriptor(
            family=layout.family,
            layout=layout.config.model_dump(mode="json"),
            fingerprint=layout.fingerprint,
            grid=placement.grid,
            num_tokens=placement.num_tokens,
        )
        assert Descriptor.model_validate_json(d.model_dump_json()) == d


# -- free text is never a processed payload; real processed payloads always are ---------------------

_B64_ALPHABET = string.ascii_letters + string.digits + "+/= \n\t"
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.text(max_size=12).filter(lambda k: k not in PROCESSED_KEYS | IMAGE_KEYS), inner)
    ),
    max_leaves=40,
)
_file = st.from_regex(r"[a-z0-9_\-]{1,24}\.(py|txt|json|png|log)", fullmatch=True)
_tool_output = st.one_of(
    st.text(max_size=300),
    # the alphabet the old guard refused at 4,096 characters
    st.text(alphabet=_B64_ALPHABET, min_size=4096, max_size=12000),
    st.lists(st.integers(0, 10**6), min_size=1100, max_size=3000).map(lambda xs: " ".join(map(str, xs))),
    st.lists(st.binary(min_size=32, max_size=32), min_size=64, max_size=200).map(
        lambda ds: "\n".join(d.hex() for d in ds)
    ),  # hex digests, one a line
    st.binary(min_size=1024, max_size=8192).map(
        lambda b: "\n".join(f"{i:08x}: {b[i : i + 16].hex(' ')}" for i in range(0, len(b), 16))
    ),  # a hex dump
    st.lists(st.tuples(st.integers(0, 10**9), _file), min_size=1, max_size=400).map(
        lambda rows: "\n".join(f"-rw-r--r-- 1 user user {n:>10} Dec  4 03:00 {f}" for n, f in rows)
    ),  # a listing
    _json.map(json.dumps),
    _json.map(lambda v: json.dumps(v, indent=2)),
    st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=3000).map(
        lambda xs: json.dumps([xs[i : i + 8] for i in range(0, len(xs), 8)])
    ),  # a matrix printed by a tool: text, not a structure
    # base64 of bytes that are no image (an archive, a key): what the bytes are decides, not the text
    st.binary(min_size=16, max_size=6000)
    .filter(
        lambda b: not b.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"II*", b"MM\x00", b"BM"))
    )
    .map(lambda b: base64.b64encode(b).decode()),
)


def _messages(text: str, structured) -> list[dict]:
    return [
        {"role": "system", "content": text},
        {"role": "user", "content": [{"type": "text", "text": text}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "run", "arguments": text}}
        ]},
        {"role": "tool", "tool_call_id": "c", "content": text, "metadata": structured},
    ]  # fmt: skip


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_tool_output, structured=_json)
def test_text_json_and_tool_output_are_never_processed_payloads(text, structured):
    reject_processed(_messages(text, structured))
    Sample.model_validate(sample().model_dump() | {"meta": {"tool_output": text}})


FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_base64_images_are_refused_wherever_they_are(fmt):
    b64 = base64.b64encode(image_bytes(40, 30, fmt, seed=3)).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME-style lines

    def part(p: dict) -> list[dict]:
        return [{"role": "user", "content": [p]}]

    places = [
        ("$[0].content", [{"role": "tool", "content": b64}]),
        ("$[0].content[0].text", part({"type": "text", "text": wrapped})),
        ("$[0].content[0].image_url.url", part({"type": "image_url", "image_url": {"url": b64}})),
        ("$[0].content[0].image", part({"type": "image", "image": b64})),
        ("$[0].content[0].image_url", part({"type": "input_image", "image_url": b64})),
        ("$[0].content[0].text", part({"type": "text", "text": f"the chart: {b64} as you asked"})),
        ("$[0].content", [{"role": "tool", "content": json.dumps({"ok": True, "png": b64})}]),
        # after a ref: only a well-formed ref alone (a blake3 digest after the prefix) is passed over
        ("$[0].content", [{"role": "tool", "content": f"{REF_PREFIX}blake3:{'0' * 64} {b64}"}]),
    ]
    for path, messages in places:
        with pytest.raises(ProcessedPayloadError) as exc:
            reject_processed(messages)
        assert exc.value.path == path


def test_base64_in_an_image_field_is_refused_whatever_it_decodes_to():
    """An image field holds a ref (or, before offload, a URL or data URI), never bare base64."""
    b64 = base64.b64encode(bytes(range(256)) * 4).decode()
    with pytest.raises(ProcessedPayloadError, match="where an image ref belongs"):
        reject_processed([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": b64}}]}])
    reject_processed([{"role": "tool", "content": b64}])  # the same text as a tool's output is text


def test_real_pixel_values_as_json_are_refused(tiny_qwen2_vl):
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_qwen2_vl)
    out = processor(images=[Image.new("RGB", (56, 56), (10, 200, 30))], return_tensors="np")
    features = out["pixel_values"].tolist()  # a tensor written out as nested lists, under any key
    assert len(features) * len(features[0]) >= 1024
    with pytest.raises(ProcessedPayloadError, match="nested array") as exc:
        reject_processed([{"role": "user", "content": [{"type": "text", "text": "x"}], "features": features}])
    assert exc.value.path == "$[0].features"
    with pytest.raises(ProcessedPayloadError, match="pixel_values"):
        reject_processed({"inputs": {"pixel_values": features[:1]}})
    with pytest.raises(ProcessedPayloadError, match="ndarray"):
        reject_processed({"inputs": {"image_grid_thw": out["image_grid_thw"]}})
