"""Property-based conversations through render -> inference -> sample -> trainer materialization.

Hypothesis draws conversations (turn counts, images per turn, sizes, image modes, text with
special-token look-alikes, truncation limits) and each runs through the real renderer, the real
inference service (vLLM, tiny Qwen2-VL), and the trainer's real materialization (HF processor),
asserting the invariants: vLLM's prompt equals the rendered ids, every placeholder run matches
its descriptor, every turn extends the previous one exactly, a truncated sample never splits an
image run, and the trainer sees the pixels inference sampled from (strict).

CI runs a short budget (``HYPOTHESIS_PROFILE`` unset: 6 conversations); ``make fuzz`` runs the
long one (``HYPOTHESIS_PROFILE=long``: 1000 conversations).
"""

from __future__ import annotations

import base64
import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mmstore_client.inference import GenerateRequest, SamplingOptions
from mmstore_client.offload import offload_messages
from mmstore_client.placeholders import check_runs
from mmstore_client.render import RenderError
from mmstore_client.samples import sample_from_rendered
from mmstore_client.truncate import TruncationPolicy, safe_cut, truncate_sample
from PIL import Image

pytestmark = pytest.mark.slow

settings.register_profile(
    "ci", max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
settings.register_profile("long", max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

MODES = ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16"]
REAL_SPECIALS = ["<|image_pad|>", "<|vision_start|>"]  # real special tokens typed as text
LOOKALIKES = ["<|image_pad |>", "<image>", "< |vision_start| >", "image_pad", "\uff1c|image_pad|\uff1e", ""]
TEXTS = [*LOOKALIKES, *REAL_SPECIALS]


@st.composite
def images(draw) -> bytes:
    w, h = draw(st.integers(8, 320)), draw(st.integers(8, 320))
    mode = draw(st.sampled_from(MODES))
    color = draw(st.integers(0, 255))
    img = Image.new("RGB", (w, h), (color, 255 - color, (color * 7) % 256))
    img.paste((255 - color, color, 30), (0, 0, max(1, w // 3), max(1, h // 2)))
    img = img.convert("I;16") if mode == "I;16" else img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    return buf.getvalue()


@st.composite
def conversations(draw) -> list[list[dict]]:
    """Turns of new messages: each a user (or tool) message with 0-2 images and odd text."""
    turns = []
    for _ in range(draw(st.integers(1, 4))):
        parts = [
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64," + base64.b64encode(i).decode()},
            }
            for i in draw(st.lists(images(), min_size=0, max_size=2))
        ]
        text = draw(st.sampled_from(TEXTS)) + draw(st.text(max_size=20))
        parts.insert(draw(st.integers(0, len(parts))), {"type": "text", "text": text})
        turns.append([{"role": draw(st.sampled_from(["user", "tool"])), "content": parts}])
    return turns


def _contains_real_special(turn: list[dict]) -> bool:
    return any(s in p.get("text", "") for m in turn for p in m["content"] for s in REAL_SPECIALS)


@given(conv=conversations(), limit=st.integers(16, 400))
def test_conversations_keep_every_invariant(parts, conv, limit):
    client, renderer, inf, materializer = parts
    rendered = None
    for k, turn in enumerate(conv):
        messages = offload_messages(turn, client, "fuzz")
        try:
            nxt = renderer.render(messages) if rendered is None else renderer.bridge(rendered, messages)
        except RenderError as exc:  # only real special tokens typed as text may be refused
            assert exc.code == "placeholder_mismatch" and _contains_real_special(turn)
            return
        if rendered is not None:
            assert nxt.token_ids[: len(rendered.token_ids)] == rendered.token_ids
            assert nxt.descriptors[: len(rendered.descriptors)] == rendered.descriptors
        spans = check_runs(nxt.token_ids, nxt.descriptors, renderer.image_token_id)
        assert spans == nxt.image_spans
        response = inf.generate(
            GenerateRequest(
                prompt_token_ids=nxt.token_ids,
                descriptors=nxt.descriptors,
                sampling=SamplingOptions(max_tokens=3, temperature=1.0, seed=k),
            )
        )
        assert response.prompt_token_ids == nxt.token_ids
        completion = response.samples[0].token_ids
        rendered = nxt.extend(completion, assistant=True)
        rendered.messages.append({"role": "assistant", "content": renderer.tokenizer.decode(completion)})
        pixel_digests = response.pixel_digests
    sample = sample_from_rendered(rendered, sample_id="fuzz", advantages=1.0).model_copy(
        update={"pixel_digests": pixel_digests}
    )
    assert materializer(sample).pixels_checked == len(sample.descriptors)
    cut = truncate_sample(sample, limit, TruncationPolicy.CUT)
    if cut is not None:
        assert len(cut.token_ids) == safe_cut(sample, limit) <= limit
        check_runs(cut.token_ids, cut.descriptors, renderer.image_token_id)
        materializer(cut)  # still a valid, verifiable sample
    assert truncate_sample(sample, limit, TruncationPolicy.DROP_SAMPLE) in (None, sample)
