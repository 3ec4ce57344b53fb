"""Trainer packing and steps on tiny Qwen2-VL / Qwen3-VL with a real mmstore process: packed
logits equal each sample's alone, the ratio is 1 against the model's own logprobs, steps reduce
the loss, checkpoints reload in transformers, and the CLI runs (both missing-image policies)."""

from __future__ import annotations

import json

import pytest
import torch
from mmstore_client import StoreClient, compute_digest
from mmstore_client.layouts import from_pretrained as layout_from_pretrained
from mmstore_client.placeholders import image_markup_ids
from mmstore_client.render import Renderer
from mmstore_client.samples import write_samples
from mmstore_trainer import Materializer, TrainConfig, Trainer, read_metrics
from mmstore_trainer.cli import app
from mmstore_trainer.families import QwenVLFamily, UnsupportedFamily, family_class, register
from mmstore_trainer.loss import clipped_pg_loss, token_logprobs
from mmstore_trainer.pack import pack, pack_one, plan
from support import FetchingRenderer, ImageSet, image_bytes
from test_trainer_data import make_sample, upload
from typer.testing import CliRunner

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def client(store):
    with StoreClient(store.url) as c:
        yield c


def load_model(model_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def alone_logits(model, materialized) -> torch.Tensor:
    """The plain HF forward of one sample (the model computes its own positions)."""
    ids = materialized.token_ids.view(1, -1)
    images = {}
    if materialized.images:
        images = {
            "pixel_values": torch.cat([im.tensors["pixel_values"] for im in materialized.images]),
            "image_grid_thw": torch.cat([im.tensors["image_grid_thw"] for im in materialized.images]),
        }
    token_type = (ids == model.config.image_token_id).int()
    return model(input_ids=ids, mm_token_type_ids=token_type, use_cache=False, **images).logits[0]


def test_clipped_loss_and_logprobs_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    tokens = torch.tensor([0, 2])
    expected = torch.log_softmax(logits / 0.5, -1)[[0, 1], tokens]
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=0.5), expected)
    # banned ids leave the distribution: the rest renormalises, exactly as vLLM's logit_bias -inf
    wide = torch.tensor([[2.0, 1.0, -1.0, 0.3, 0.9], [0.5, 0.5, 3.0, -2.0, 1.5]])
    banned = torch.tensor([1, 4])
    renorm = torch.log_softmax(wide[:, [0, 2, 3]] / 0.5, -1)[[0, 1], [0, 1]]  # tokens 0 and 2 among 0,2,3
    torch.testing.assert_close(token_logprobs(wide, tokens, temperature=0.5, banned=banned), renorm)
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 0.9]))  # old logprobs 0: ratio = exp(new)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = clipped_pg_loss(new, torch.zeros(4), adv, eps_low=0.2, eps_high=0.2, normalizer=8)
    # per token max(-A r, -A clip(r)): -1, -1.2 (clipped), 0.8 (clipped), 0.9
    assert abs(float(loss) - (-1 - 1.2 + 0.8 + 0.9) / 8) < 1e-6
    assert stats.clipped == 2 and stats.tokens == 4
    assert (stats.ratio_min, stats.ratio_max) == pytest.approx((0.5, 1.5))
    total = stats.add(stats).summary()
    assert total["clip_frac"] == 0.5 and total["ratio_mean"] == pytest.approx(3.9 / 4)


def test_family_registry_names_what_is_supported():
    with pytest.raises(UnsupportedFamily, match="supported: qwen2_vl, qwen3_vl"):
        family_class("gemma3")
    with pytest.raises(TypeError, match="already registered"):
        register("qwen2_vl")(type("Again", (QwenVLFamily,), {}))


def test_plan_first_fit_decreasing():
    assert plan([5, 3, 8, 2, 6], 8) == [[0, 1], [2], [3, 4]]
    assert plan([12, 1], 8) == [[0], [1]]  # over budget: alone, never split or dropped
    assert plan([], 8) == []


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
@torch.no_grad()
def test_packed_logits_equal_each_sample_alone(request, family, store, client):
    model_dir = request.getfixturevalue(f"tiny_{family}")
    renderer = FetchingRenderer(Renderer.from_pretrained(model_dir), client)
    refs, _ = upload(client, "trainer-step", [(100, 140), (300, 200), (64, 64)], seed=600)
    samples = [
        make_sample(renderer, refs[:1], "one-image"),
        make_sample(renderer, [], "text-only", answer="Hello, world!"),
        make_sample(renderer, refs[1:], "two-images", answer="The quick brown fox."),
    ]
    materializer = Materializer.from_pretrained(model_dir, StoreClient(store.url))
    materialized = [materializer(s) for s in samples]
    model = load_model(model_dir)
    mb = pack_one(materialized, materializer.family, model)
    assert mb.num_images == 3 and mb.sample_ids == ["one-image", "text-only", "two-images"]
    packed = model(**mb.forward_kwargs(materializer.family)).logits[0]
    bounds = mb.cu_seqlens.tolist()
    for m, lo, hi in zip(materialized, bounds, bounds[1:], strict=False):
        alone = alone_logits(model, m)
        assert packed[lo:hi].shape == alone.shape
        torch.testing.assert_close(packed[lo:hi], alone, atol=1e-5, rtol=0)
    # the test can fail: one position row for the whole pack lets samples attend across
    crossed = mb.position_ids.clone()
    crossed[0, 0] = torch.arange(mb.num_tokens)
    leaky = model(**materializer.family.forward_kwargs(mb.input_ids, crossed, mb.model_inputs)).logits[0]
    assert (leaky[bounds[1] :] - packed[bounds[1] :]).abs().max() > 1e-3
    # a budget below the total splits into micro-batches that still cover every sample once
    micro = pack(materialized, materializer.family, model, token_budget=bounds[-1] - 1)
    assert len(micro) > 1 and sorted(i for m in micro for i in m.sample_ids) == sorted(mb.sample_ids)


@pytest.fixture(scope="module")
def fixed_batch(tiny_qwen2_vl, store, client, tmp_path_factory):
    """Two samples (advantage +1 and -1) whose logprobs are the model's own at TEMPERATURE with the
    image markup banned (as vLLM samples by default), computed unpacked the plain HF way: the
    trainer's first ratio must be exactly 1."""
    renderer = FetchingRenderer(Renderer.from_pretrained(tiny_qwen2_vl), client)
    refs, _ = upload(client, "trainer-step", [(120, 160), (200, 100)], seed=700)
    samples = [
        make_sample(renderer, refs[:1], "good", advantages=1.0, answer="A red square, a blue circle."),
        make_sample(renderer, refs[1:], "bad", advantages=-1.0, answer="Reward: wrong. The answer is 7."),
    ]
    model = load_model(tiny_qwen2_vl)
    materializer = Materializer.from_pretrained(tiny_qwen2_vl, StoreClient(store.url))
    banned = sorted(image_markup_ids(renderer.tokenizer, renderer.layout))
    out = []
    with torch.no_grad():
        for s in samples:
            logits = alone_logits(model, materializer(s)).clone()
            logits[:, banned] = float("-inf")
            ids = torch.tensor(s.token_ids)
            lp = torch.log_softmax(logits[:-1] / TEMPERATURE, -1).gather(-1, ids[1:, None]).squeeze(-1)
            logprobs = [0.0] + [float(v) if m else 0.0 for v, m in zip(lp, s.loss_mask[1:], strict=True)]
            out.append(s.model_copy(update={"logprobs": logprobs}))
    path = tmp_path_factory.mktemp("batch") / "samples.jsonl"
    write_samples(path, out)
    return path, out


def test_steps_reduce_loss_ratio_one_and_checkpoint_reloads(tiny_qwen2_vl, store, fixed_batch, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path, samples = fixed_batch
    lengths = [len(s.token_ids) for s in samples]
    config = TrainConfig(
        model=tiny_qwen2_vl, data=[path], out=tmp_path / "run", store=store.url, steps=20, batch_size=2,
        token_budget=max(lengths), lr=1e-2, temperature=TEMPERATURE, workers=2, prefetch=2, progress=False,
    )  # fmt: skip
    with Trainer(config) as trainer:
        report = trainer.run()
        trained = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    first = report.metrics[0]
    n_good, n_bad = (sum(s.loss_mask[1:]) for s in samples)
    assert first.micro_batches == 2 and first.trained_tokens == n_good + n_bad
    assert (
        abs(first.ratio_mean - 1) < 1e-4
        and abs(first.ratio_min - 1) < 1e-4
        and abs(first.ratio_max - 1) < 1e-4
    )
    assert first.clip_frac == 0 and abs(first.loss - (n_bad - n_good) / (n_good + n_bad)) < 1e-4
    losses = [m.loss for m in report.metrics]
    assert losses[-1] < losses[0] - 0.1, losses
    assert report.metrics[-1].clip_frac > 0  # it pushed the ratios to the clip range
    assert [m["step"] for m in read_metrics(report.metrics_path)] == list(range(1, 21))
    assert all(m.images == 2 and m.wait_s >= 0 and m.fetch_s > 0 for m in report.metrics)

    ckpt = report.checkpoint
    assert ckpt == tmp_path / "run" / "checkpoints" / "step-000020"
    reloaded = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32)
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, trained[name]), name
    original = load_model(tiny_qwen2_vl).state_dict()
    assert any(not torch.equal(original[k], trained[k]) for k in trained)
    AutoProcessor.from_pretrained(ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (ckpt / name).read_bytes() == (tiny_qwen2_vl / name).read_bytes(), name
    assert layout_from_pretrained(ckpt).fingerprint == layout_from_pretrained(tiny_qwen2_vl).fingerprint
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 20


def test_cli_train_missing_image_policies_and_make_tiny_model(
    tiny_qwen2_vl, store, client, fixed_batch, tmp_path
):
    _, samples = fixed_batch
    local = image_bytes(80, 60, seed=800)  # never uploaded: the store answers 404
    never = FetchingRenderer(
        Renderer.from_pretrained(tiny_qwen2_vl), ImageSet({compute_digest(local): local})
    )
    missing = make_sample(never, [f"mmstore://blobs/{compute_digest(local)}"], "missing", advantages=1.0)
    data = tmp_path / "samples.parquet"
    write_samples(data, [samples[0], missing])
    args = ["train", "--model", str(tiny_qwen2_vl), "--data", str(data), "--store", store.url]
    args += ["--steps", "2", "--batch-size", "2", "--no-progress", "--workers", "1"]
    runner = CliRunner()

    result = runner.invoke(app, [*args, "--out", str(tmp_path / "strict")])
    assert result.exit_code == 2, result.output
    assert "sample 'missing' image 0" in result.output and "placeholder_zero_loss" in result.output

    out = tmp_path / "lenient"
    args += ["--out", str(out), "--missing-images", "placeholder_zero_loss"]
    result = runner.invoke(app, args, env={"MMSTORE_TRAINER_LR": "0.001"})
    assert result.exit_code == 0, result.output
    metrics = read_metrics(out / "metrics.jsonl")
    assert [(m["missing_images"], m["zero_loss_samples"]) for m in metrics] == [(1, 1), (1, 1)]
    assert all(m["trained_tokens"] == sum(samples[0].loss_mask[1:]) for m in metrics)
    state = json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["config"]["lr"] == 0.001 and state["config"]["missing_images"] == "placeholder_zero_loss"

    result = runner.invoke(app, ["make-tiny-model", str(tiny_qwen2_vl)])
    assert result.exit_code == 0 and result.output.strip() == str(tiny_qwen2_vl)
    result = runner.invoke(app, ["make-tiny-model", str(tmp_path / "x"), "--family", "nope"])
    assert result.exit_code == 2 and "unknown family" in result.output
