"""Descriptor and sample schemas: strict, lossless, and closed to processed payloads."""

from __future__ import annotations

import numpy as np
import pytest
from mmstore_client.descriptor import Descriptor, ImageSpan, ProcessedPayloadError, Sample, reject_processed
from mmstore_client.digest import compute_digest
from pydantic import ValidationError

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
        ({"x": "A" * 5000}, "$.meta.x"),
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
