"""The vision tower's attention as one variable-length call (mmstore_trainer.attention): the same
outputs and gradients as transformers' per-image SDPA, on tiny Qwen2-VL and Qwen3-VL.

The kernel, ``torch.nn.attention.varlen.varlen_attn``, is flash attention: CUDA only. On the CPU
(CI) a reference with its signature (SDPA per sequence, written below) stands in for it, which
checks everything of ours: transformers routes the tower's image boundaries to our function, and
our function's layouts, boundaries and scale are right. On a GPU the real kernel runs against
SDPA (``test_real_varlen_kernel_matches_per_image_sdpa_on_cuda``, skipped without CUDA).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from mmstore_trainer.attention import VARLEN, use_varlen, varlen_attention, varlen_available
from mmstore_trainer.families import QwenVLFamily


def reference_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
    """Stands in for the CUDA kernel on the CPU: (tokens, heads, dim) in and out, SDPA per sequence."""
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    assert max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    bounds = cu_seq_q.tolist()
    outs = [
        torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), scale=scale
        ).transpose(0, 1)
        for s, e in itertools.pairwise(bounds)
    ]
    return torch.cat(outs)


def load(model_dir, device="cpu", dtype=torch.float32):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=dtype).to(device)


def tower_inputs(model, device="cpu", dtype=torch.float32):
    """Three images of different sizes, as the image processor packs them."""
    vc = model.config.vision_config
    grid = torch.tensor([[1, 4, 6], [1, 8, 4], [1, 2, 2]], device=device)
    n = int(grid.prod(-1).sum())
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    pixels = torch.randn(n, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return pixels, grid


def tower_output(model, pixels, grid):
    out = model.model.visual(pixels, grid_thw=grid)
    out = getattr(out, "pooler_output", out)
    return out if torch.is_tensor(out) else torch.cat(list(out))


@pytest.mark.parametrize("fixture", ["tiny_qwen2_vl", "tiny_qwen3_vl"])
def test_one_varlen_call_per_layer_gives_the_per_image_outputs_and_gradients(fixture, request, monkeypatch):
    model_dir = request.getfixturevalue(fixture)
    calls = []

    def kernel(*args, **kwargs):
        calls.append(args[3].tolist())
        return reference_varlen_attn(*args, **kwargs)

    monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", kernel)
    ours, theirs = load(model_dir), load(model_dir)
    family = QwenVLFamily(None)
    assert use_varlen(family.varlen_attention_configs(ours)) == 1
    assert ours.config.vision_config._attn_implementation == VARLEN
    assert theirs.config.vision_config._attn_implementation == "sdpa"
    assert ours.config.text_config._attn_implementation == "sdpa"  # the language model is untouched

    pixels, grid = tower_inputs(ours)
    a, b = tower_output(ours, pixels, grid), tower_output(theirs, pixels, grid)
    depth = ours.config.vision_config.depth
    assert len(calls) == depth  # one call a layer for all three images, not one per image
    assert calls[0] == [0, 24, 56, 60]  # the images' patch boundaries
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, pa), (_, pb) in zip(
        ours.model.visual.named_parameters(), theirs.model.visual.named_parameters(), strict=True
    ):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_only_sdpa_configs_switch_and_the_cpu_keeps_sdpa(tiny_qwen2_vl):
    model = load(tiny_qwen2_vl)
    vision = model.config.vision_config
    vision._attn_implementation = "eager"  # a user's explicit choice is left alone
    assert use_varlen([vision]) == 0
    assert vision._attn_implementation == "eager"
    assert not varlen_available(torch.device("cpu"))  # flash attention is CUDA's


def test_varlen_attention_refuses_what_it_cannot_compute():
    q = torch.zeros(1, 2, 4, 8)
    cu = torch.tensor([0, 4])
    with pytest.raises(ValueError, match="boundaries"):
        varlen_attention(None, q, q, q, None)
    with pytest.raises(ValueError, match="no mask"):
        varlen_attention(
            None,
            q,
            q,
            q,
            torch.ones(1, 1, 4, 4),
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=4,
            max_length_k=4,
        )
    with pytest.raises(ValueError, match="no mask"):
        varlen_attention(
            None,
            q,
            q,
            q,
            None,
            is_causal=True,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=4,
            max_length_k=4,
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen kernel is flash attention: CUDA only")
def test_real_varlen_kernel_matches_per_image_sdpa_on_cuda(tiny_qwen2_vl):
    ours, theirs = load(tiny_qwen2_vl, "cuda", torch.bfloat16), load(tiny_qwen2_vl, "cuda", torch.bfloat16)
    assert varlen_available(torch.device("cuda"))
    use_varlen(QwenVLFamily(None).varlen_attention_configs(ours))
    pixels, grid = tower_inputs(ours, "cuda", torch.bfloat16)
    a, b = tower_output(ours, pixels, grid), tower_output(theirs, pixels, grid)
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    a.float().square().sum().backward()
    b.float().square().sum().backward()
    ga = torch.cat([p.grad.float().flatten() for p in ours.model.visual.parameters()])
    gb = torch.cat([p.grad.float().flatten() for p in theirs.model.visual.parameters()])
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.999


def test_a_checkpoint_saved_after_the_switch_reloads_anywhere(tiny_qwen2_vl, tmp_path):
    """The switch is a run-time setting: config.json does not carry it, so the checkpoint loads
    in transformers (which would look for a hub kernel of that name) and vLLM as before."""
    model = load(tiny_qwen2_vl)
    use_varlen(QwenVLFamily(None).varlen_attention_configs(model))
    model.save_pretrained(tmp_path)
    assert VARLEN not in (tmp_path / "config.json").read_text()
    assert load(tmp_path).config.vision_config._attn_implementation == "sdpa"
