"""Image tokens vs image features, through the real services (issue: make the mismatch impossible).

Every test here runs the real store, the real inference service (vLLM, tiny Qwen2-VL) and the
trainer's real materialization (HF processor).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from mmstore_client import ConflictError, decode
from mmstore_client.inference import GenerateRequest, SamplingOptions
from mmstore_client.layouts import LayoutRefusal
from mmstore_client.offload import OffloadError, OffloadPolicy, offload_messages
from mmstore_client.samples import sample_from_rendered
from mmstore_trainer.data import MaterializationError
from PIL import Image
from support import noise_png

pytestmark = pytest.mark.slow
RUN = "agreement"


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def image_modes() -> dict[str, bytes]:
    """One real file per mode the decoding rule handles."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 255, (60, 90), dtype=np.uint8)))
    p = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (50, 40), c) for c in [(255, 0, 0), (0, 0, 255)]]
    return {
        "rgba": encode(rgba, "PNG"),
        "la": encode(rgba.convert("LA"), "PNG"),
        "p_transparent": encode(p, "PNG", transparency=3),
        "cmyk": encode(rgb.convert("CMYK"), "JPEG", quality=90),
        "gray16": encode(Image.fromarray((rng.integers(0, 65535, (40, 70))).astype(np.uint16)), "PNG"),
        "gray": encode(rgb.convert("L"), "PNG"),
        "exif_rotated": encode(rgb, "JPEG", exif=exif, quality=90),
        "gif_animated": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
    }


def uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, *images: bytes, role: str = "user") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": uri(i)}} for i in images]
    return {"role": role, "content": [*parts, {"type": "text", "text": text}]}


def generate(inf, rendered, **sampling):
    return inf.generate(
        GenerateRequest(
            prompt_token_ids=rendered.token_ids,
            descriptors=rendered.descriptors,
            sampling=SamplingOptions(**({"max_tokens": 6, "temperature": 0.0} | sampling)),
        )
    )


def test_trainer_sees_the_pixels_vllm_sampled_from_for_every_mode(parts):
    client, renderer, inf, materializer = parts
    files = image_modes()
    messages = offload_messages([user("what is it?", *files.values())], client, RUN)
    rendered = renderer.render(messages)
    response = generate(inf, rendered)
    assert response.prompt_token_ids == rendered.token_ids
    for (mode, data), reported in zip(files.items(), response.pixel_digests, strict=True):
        assert reported == decode.pixel_digest(decode.decode_rgb(data)), mode
    done = rendered.extend(response.samples[0].token_ids, assistant=True)
    sample = sample_from_rendered(done, sample_id="modes", advantages=1.0).model_copy(
        update={"pixel_digests": response.pixel_digests}
    )
    materialized = materializer(sample)  # strict: any pixel disagreement would raise
    assert materialized.pixels_checked == len(files) and materialized.pixel_mismatches == 0
    # and the check can fail: a sample claiming other pixels is refused, naming the image
    wrong = list(response.pixel_digests)
    wrong[3] = decode.pixel_digest(Image.new("RGB", (1, 1)))
    with pytest.raises(MaterializationError, match="pixels"):
        materializer(sample.model_copy(update={"pixel_digests": wrong}))


def test_sampled_image_tokens_are_rejected_by_name_never_a_crash(parts):
    client, renderer, inf, materializer = parts
    pad = renderer.image_token_id
    rendered = renderer.render(offload_messages([user("x", noise_png(2000, seed=1))], client, RUN))
    # allowed, the random policy samples image pads sooner or later
    completion = None
    for seed in range(20):
        r = generate(inf, rendered, temperature=2.0, max_tokens=64, seed=seed, allow_image_tokens=True)
        if pad in r.samples[0].token_ids:
            completion = r.samples[0].token_ids
            break
    assert completion is not None, "the tiny policy never sampled <|image_pad|> in 20 tries"
    done = rendered.extend(completion, assistant=True)
    done.messages.append({"role": "assistant", "content": renderer.tokenizer.decode(completion)})
    nxt = renderer.bridge(done, offload_messages([user("and now?", noise_png(2000, seed=2))], client, RUN))
    assert nxt.token_ids[: len(done.token_ids)] == done.token_ids
    with pytest.raises(ConflictError) as exc:
        generate(inf, nxt)
    assert exc.value.code == "placeholder_mismatch"
    assert "not tied to a descriptor" in exc.value.message
    sample = sample_from_rendered(nxt, sample_id="stray", advantages=1.0)
    with pytest.raises(MaterializationError, match="not tied to a descriptor"):
        materializer(sample)
    # the service is still healthy
    assert generate(inf, rendered).prompt_token_ids == rendered.token_ids


def test_sizes_the_processor_refuses_are_refused_at_offload_and_render(parts):
    client, renderer, _, _ = parts
    thin = noise_png(10, seed=3)
    thin = encode(Image.new("RGB", (1000, 4), (200, 10, 10)), "PNG")
    policy = OffloadPolicy(check_size=renderer.layout.place)
    with pytest.raises(OffloadError) as exc:
        offload_messages([user("x", thin)], client, RUN, policy)
    assert exc.value.code == "image_refused_by_layout" and "qwen2_vl" in str(exc.value)
    assert "aspect ratio" in str(exc.value).lower()
    # offloaded without the check, the renderer still refuses it before any service sees it
    messages = offload_messages([user("x", thin)], client, RUN)
    with pytest.raises(LayoutRefusal, match="qwen2_vl"):
        renderer.render(messages)


def test_twenty_turns_with_tool_images_extend_exactly(parts):
    client, renderer, inf, materializer = parts
    rendered = renderer.render(offload_messages([user("turn 0", noise_png(1500, seed=100))], client, RUN))
    for turn in range(1, 21):
        response = generate(inf, rendered, max_tokens=3)
        assert response.prompt_token_ids == rendered.token_ids
        done = rendered.extend(response.samples[0].token_ids, assistant=True)
        done.messages.append(
            {"role": "assistant", "content": renderer.tokenizer.decode(response.samples[0].token_ids)}
        )
        role = "tool" if turn % 3 == 0 else "user"
        message = user(f"turn {turn}", noise_png(1500, seed=100 + turn), role=role)
        new = offload_messages([message], client, RUN)
        nxt = renderer.bridge(done, new)
        assert nxt.token_ids[: len(done.token_ids)] == done.token_ids
        assert nxt.descriptors[: len(done.descriptors)] == done.descriptors
        assert len(nxt.descriptors) == turn + 1
        rendered = nxt
    final = generate(inf, rendered, max_tokens=3)
    assert final.prompt_token_ids == rendered.token_ids
    sample = sample_from_rendered(
        rendered.extend(final.samples[0].token_ids, assistant=True), sample_id="twenty", advantages=0.5
    ).model_copy(update={"pixel_digests": final.pixel_digests})
    assert materializer(sample).pixels_checked == 21
