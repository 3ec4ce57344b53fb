"""Sample files keep every field of every sample, in both formats (hypothesis, no services).

Samples are drawn from the pydantic models themselves (``model_strategies``): every field of
``Sample``, ``Descriptor`` and ``ImageSpan`` is derived from its annotation, so a field added to
the schema is drawn (and must round-trip) without this test changing. Only the fields that the
schema ties together (lengths, spans matching descriptors) are laid out here, still from their
annotations' element strategies.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mmstore_client.descriptor import Descriptor, ImageSpan
from mmstore_client.render import Rendered
from mmstore_client.samples import Sample, SampleFileError, read_samples, sample_from_rendered, write_samples
from model_strategies import element, field_values, for_field, for_model


def _sized(name: str, n: int):
    """The field's derived strategy; when it draws a list, a list of exactly ``n`` of its elements."""
    return for_field(Sample, name).flatmap(
        lambda v: (
            st.lists(element(Sample, name), min_size=n, max_size=n) if isinstance(v, list) else st.just(v)
        )
    )


@st.composite
def samples(draw) -> Sample:
    descriptors = draw(st.lists(for_model(Descriptor, num_tokens=st.integers(1, 6)), max_size=3))
    gaps = draw(st.lists(st.integers(0, 4), min_size=len(descriptors) + 1, max_size=len(descriptors) + 1))
    spans, pos = [], 0
    for gap, d in zip(gaps, descriptors, strict=False):
        spans.append(ImageSpan(start=pos + gap, length=d.num_tokens))
        pos += gap + d.num_tokens
    n = pos + gaps[-1]
    on_image = {i for s in spans for i in range(s.start, s.start + s.length)}
    mask = draw(_sized("loss_mask", n))
    tied = {
        "token_ids": draw(_sized("token_ids", n)),
        "loss_mask": [m and i not in on_image for i, m in enumerate(mask)],
        "advantages": draw(_sized("advantages", n)),
        "logprobs": draw(_sized("logprobs", n)),
        "descriptors": descriptors,
        "image_spans": spans,
        "pixel_digests": draw(_sized("pixel_digests", len(descriptors))),
    }
    values = draw(field_values(Sample, **{k: st.just(v) for k, v in tied.items()}))
    return Sample.model_validate(values)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(samples(), min_size=1, max_size=4), suffix=st.sampled_from([".jsonl", ".parquet"]))
def test_every_field_of_every_sample_round_trips(batch, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"samples{suffix}"
        assert write_samples(path, batch) == len(batch)
        got = list(read_samples(path))
    # JSON tells 1 from 1.0 from true and a tuple's length, where == on models would not
    assert [s.model_dump_json() for s in got] == [s.model_dump_json() for s in batch]


def test_parquet_keeps_pixel_digests(tmp_path):
    """The trainer's pixel check reads them: Parquet files once dropped them without a word."""
    image = Descriptor(
        digest=f"blake3:{1:064x}", mime="image/png", width=28, height=28, family="qwen2_vl",
        layout={"patch_size": 14}, fingerprint="f", grid=(1, 2, 2), num_tokens=1,
    )  # fmt: skip
    sample = Sample(
        sample_id="s", token_ids=[7, 8, 9], loss_mask=[False, False, True], advantages=1.0,
        logprobs=[0.0] * 3, descriptors=[image], image_spans=[ImageSpan(start=1, length=1)],
        pixel_digests=[f"blake3:{2:064x}"],
    )  # fmt: skip
    write_samples(tmp_path / "s.parquet", [sample])
    assert pq.read_table(tmp_path / "s.parquet").column("pixel_digests").to_pylist() == [[f"blake3:{2:064x}"]]
    assert next(read_samples(tmp_path / "s.parquet")).pixel_digests == sample.pixel_digests


def test_a_field_the_parquet_layout_lacks_fails_loudly(tmp_path):
    class Newer(Sample):  # a field added to the schema but not to the Parquet layout
        curriculum_stage: int = 3

    sample = Newer(sample_id="s", token_ids=[1], loss_mask=[True], advantages=1.0, logprobs=[0.0])
    with pytest.raises(SampleFileError, match="curriculum_stage"):
        write_samples(tmp_path / "s.parquet", [sample])
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# ----------------------------------------------------------------------------- format v1 on disk

V1_FILES = Path(__file__).resolve().parent / "data" / "samples"


def _v1_samples() -> list[Sample]:
    """The samples of ``tests/data/samples/format-v1.*``, written by the trainer's writer
    (``mmstore_trainer.samples``) before the module moved to ``mmstore_client.samples``: an image
    sample with a scalar advantage, reward, pixel digests and meta as a rollout worker writes it;
    per-token advantages with no image, reward or pixel digests; a one-token sample."""
    image = Descriptor(
        digest=f"blake3:{0xAB:064x}", mime="image/jpeg", width=56, height=28, family="qwen2_vl",
        layout={"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136,
                "max_pixels": 12845056}, fingerprint="qwen2_vl-5f0c1e2d", grid=(1, 2, 4), num_tokens=2,
    )  # fmt: skip
    return [
        Sample(
            sample_id="seed0-0", token_ids=[151644, 872, 151655, 151655, 151645, 9707, 13, 151645],
            loss_mask=[False] * 5 + [True] * 3, advantages=-0.75,
            logprobs=[0.0] * 5 + [-0.125, -2.5, -0.001953125], descriptors=[image],
            image_spans=[ImageSpan(start=2, length=2)], reward=0.25,
            pixel_digests=[f"blake3:{0xCD:064x}"], meta={"seed": 0, "turns": 2, "source": "rollout"},
        ),
        Sample(
            sample_id="per-token", token_ids=[1, 2, 3], loss_mask=[False, True, True],
            advantages=[0.0, 1.5, -1.0], logprobs=[0.0, -0.5, -0.25],
        ),
        Sample(sample_id="one", token_ids=[5], loss_mask=[False], advantages=[2.0], logprobs=[0.0]),
    ]  # fmt: skip


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_format_v1_files_read_back_field_for_field(suffix):
    got = list(read_samples(V1_FILES / f"format-v1{suffix}"))
    assert [s.model_dump_json() for s in got] == [s.model_dump_json() for s in _v1_samples()]


def test_format_v1_jsonl_is_written_byte_for_byte(tmp_path):
    write_samples(tmp_path / "s.jsonl", _v1_samples())
    assert (tmp_path / "s.jsonl").read_bytes() == (V1_FILES / "format-v1.jsonl").read_bytes()


def test_format_v1_parquet_is_written_with_the_same_columns_and_values(tmp_path):
    write_samples(tmp_path / "s.parquet", _v1_samples())
    written, v1 = pq.read_table(tmp_path / "s.parquet"), pq.read_table(V1_FILES / "format-v1.parquet")
    assert written.schema.equals(v1.schema, check_metadata=True)
    assert written.to_pylist() == v1.to_pylist()


# ----------------------------------------------------------------------------- a light contract


def test_the_schema_and_jsonl_files_need_neither_pyarrow_nor_torch(tmp_path):
    """Rollout workers and stock-vLLM clients import the contract: only Parquet loads pyarrow."""
    code = f"""
import sys
from mmstore_client import Sample, read_samples, write_samples
path = {str(tmp_path / "s.jsonl")!r}
write_samples(path, [Sample(sample_id="s", token_ids=[1], loss_mask=[True], advantages=1.0, logprobs=[0.0])])
assert [s.sample_id for s in read_samples(path)] == ["s"]
print(sorted(m for m in ("pyarrow", "torch", "transformers") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as in an install without the extra
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    sample = Sample(sample_id="s", token_ids=[1], loss_mask=[True], advantages=1.0, logprobs=[0.0])
    with pytest.raises(ModuleNotFoundError, match=r"mmstore-client\[parquet\]"):
        write_samples(tmp_path / "s.parquet", [sample])
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_prompt_rendered_without_its_assistant_mask_is_no_sample():
    unmasked = Rendered([1, 2, 3], [], [], None)
    with pytest.raises(ValueError, match="without its assistant mask"):
        sample_from_rendered(unmasked, sample_id="s", advantages=1.0)
    masked = Rendered([1, 2, 3], [], [], [False, True, True])
    assert sample_from_rendered(masked, sample_id="s", advantages=1.0).loss_mask == [False, True, True]
