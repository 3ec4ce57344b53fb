"""The main job end to end, reduced in size; and what happens when inference dies mid-loop."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from mmstore_client import StoreClient
from mmstore_rollout.smoke import SmokeConfig, SmokeFailed, run_smoke

pytestmark = pytest.mark.slow


def test_smoke_loop_invariants(store, inference, tiny_qwen2_vl, tmp_path):
    cfg = SmokeConfig(
        out=tmp_path / "run",
        model=tiny_qwen2_vl,
        store=store.url,
        inference=inference.url,
        groups=2,
        group_size=2,
        turns=2,
        workers=2,
        train_steps=2,
        run="smoke-test",
    )
    summary = run_smoke(cfg)
    assert summary.placeholder_mismatches == 0 and summary.processed_payloads == 0
    assert summary.rollouts == 4 and summary.turns == 8
    assert summary.images == 4 and summary.unique_digests == 4
    assert summary.bytes_pixel_values > 1000 * summary.bytes_refs / 10
    assert len(summary.loss_per_step) == 2
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["rollouts"] == 4 and saved["placeholder_mismatches"] == 0
    assert (tmp_path / "run" / "samples.jsonl").read_text().count("\n") == 4
    assert summary.trainer["pixels_checked"] > 0 and summary.trainer["pixel_mismatches"] == 0
    assert summary.trainer["missing_images"] == 0
    checkpoint = Path(summary.checkpoint)
    assert (checkpoint / "config.json").is_file() and list(checkpoint.glob("*.safetensors"))


def test_smoke_loop_against_stock_vllm_with_the_plugin(store, tiny_qwen2_vl, tmp_path):
    """``--engine vllm-serve``: stock vLLM's server, refs resolved by the plugin, 0 mismatches,
    and every image the trainer materialized has the pixels the decoding rule gave vLLM."""
    cfg = SmokeConfig(
        out=tmp_path / "run",
        model=tiny_qwen2_vl,
        store=store.url,
        engine="vllm-serve",
        groups=2,
        group_size=2,
        turns=2,
        workers=2,
        train_steps=1,
        run="smoke-stock-vllm",
    )
    summary = run_smoke(cfg)
    assert summary.placeholder_mismatches == 0 and summary.inference_errors == 0
    assert summary.rollouts == 4 and summary.turns == 8
    assert summary.trainer["pixels_checked"] == summary.trainer["images"] > 0
    assert summary.trainer["pixel_mismatches"] == 0
    assert summary.replicas == []  # no mmstore-inference counters to report: no "0 requests" row


def test_inference_killed_mid_loop_fails_clearly_store_intact(tiny_qwen2_vl, tmp_path):
    from mmstore_rollout.stack import Stack, inference_service, store_service, wait_ready

    out = tmp_path / "run"
    with Stack(out / "services") as stack:
        store = stack.start(store_service(stack.workdir, root=out / "store-data"))
        inference = stack.start(inference_service(tiny_qwen2_vl, store.url, stack.workdir))
        wait_ready(stack.services, 420)
        cfg = SmokeConfig(
            out=out,
            model=tiny_qwen2_vl,
            store=store.url,
            inference=inference.url,
            groups=40,
            group_size=2,
            turns=4,
            workers=2,
            train_steps=1,
            run="killed",
        )

        def kill_when_busy():
            with StoreClient(store.url) as client:
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    try:
                        if client.run("killed").blob_count >= 4:
                            break
                    except Exception:
                        pass
                    time.sleep(0.2)
            inference.stop(grace=0.1)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        with pytest.raises(SmokeFailed) as exc:
            run_smoke(cfg)
        killer.join()
        message = str(exc.value)
        assert "rollouts failed" in message and inference.url in message
        with StoreClient(store.url) as client:
            blobs = list(client.iter_run_blobs("killed"))
            assert len(blobs) >= 4
            for blob in blobs:
                assert len(client.get(blob.digest)) == blob.size  # verified by blake3 on the way
        assert not (out / "samples.jsonl").exists(), "no partial sample file is written"


def test_context_limit_ends_trajectories_at_a_whole_turn(store, inference, tiny_qwen2_vl, tmp_path):
    """A turn that would not fit the context ends its trajectory: never a cut through an image."""
    cfg = SmokeConfig(
        out=tmp_path / "run",
        model=tiny_qwen2_vl,
        store=store.url,
        inference=inference.url,
        groups=1,
        group_size=2,
        turns=4,
        workers=1,
        train_steps=1,
        run="smoke-context",
        max_model_len=150,
    )
    summary = run_smoke(cfg)
    assert summary.context_stops == 2 and summary.placeholder_mismatches == 0
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    for s in samples:
        assert len(s["token_ids"]) <= 150  # prompt and completion stayed inside the context
        assert len(s["descriptors"]) == len(s["image_spans"]) >= 1
