"""A checkpoint the trainer saves is served by the inference service (vLLM) as it is: from one
process, and from two torchrun ranks (FSDP2's full state dict, written by rank 0)."""

from __future__ import annotations

import base64

import pytest
from conftest import inference_process
from mmstore_client import StoreClient
from mmstore_client.inference import GenerateRequest, InferenceClient, SamplingOptions
from mmstore_client.offload import offload_messages
from mmstore_client.render import Renderer
from mmstore_client.samples import sample_from_rendered, write_samples
from mmstore_trainer.config import TrainConfig
from mmstore_trainer.train import train
from support import FetchingRenderer, noise_png
from test_trainer_distributed import finish, torchrun

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ranks", [1, 2], ids=["one-process", "torchrun-2-ranks"])
def test_trained_checkpoint_loads_in_vllm_and_generates(store, tiny_qwen2_vl, tmp_path, ranks):
    client = StoreClient(store.url)
    renderer = FetchingRenderer(Renderer.from_pretrained(tiny_qwen2_vl), client)
    uri = "data:image/png;base64," + base64.b64encode(noise_png(3000, seed=5)).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}]
    rendered = renderer.render(offload_messages(messages, client, "ckpt"))
    answer = [*renderer.tokenizer.encode("3", add_special_tokens=False), renderer.eos_token_id]
    done = rendered.extend(answer, assistant=True)
    data = tmp_path / "samples.jsonl"
    write_samples(data, [sample_from_rendered(done, sample_id="s", advantages=1.0)])
    if ranks == 1:
        config = TrainConfig(
            model=tiny_qwen2_vl, data=[data], out=tmp_path / "out", store=store.url, steps=1, batch_size=1,
            lr=1e-2, progress=False,
        )  # fmt: skip
        checkpoint = train(config).checkpoint
    else:  # the one sample twice, one on each rank
        args = ["--model", str(tiny_qwen2_vl), "--data", str(data), "--store", store.url, "--steps", "1"]
        args += ["--batch-size", "2", "--lr", "1e-2", "--no-progress", "--device", "cpu"]
        proc = torchrun(ranks, [*args, "--out", str(tmp_path / "out")], tmp_path / "torchrun.log")
        assert finish(proc, tmp_path / "torchrun.log", 300) == 0, (tmp_path / "torchrun.log").read_text()
        checkpoint = tmp_path / "out" / "checkpoints" / "step-000001"
    assert checkpoint is not None and (checkpoint / "config.json").exists()

    server = inference_process(checkpoint, store.url, tmp_path)
    try:
        server.start(timeout=900)
        ckpt_renderer = FetchingRenderer(Renderer.from_pretrained(checkpoint), client)
        again = ckpt_renderer.render(offload_messages(messages, client, "ckpt"))
        assert again.token_ids == rendered.token_ids, "the checkpoint renders exactly as the base model"
        with InferenceClient(server.url) as inf:
            response = inf.generate(
                GenerateRequest(
                    prompt_token_ids=again.token_ids,
                    descriptors=again.descriptors,
                    sampling=SamplingOptions(max_tokens=4, temperature=0.0),
                )
            )
        assert response.prompt_token_ids == again.token_ids and response.samples[0].token_ids
    finally:
        server.stop()
        client.close()
