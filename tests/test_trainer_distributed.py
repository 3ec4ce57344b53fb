"""The trainer past one process: real ``torchrun`` ranks (gloo, CPU, tiny Qwen2-VL) on a real
mmstore process. Two ranks train exactly as one process does on the same global batch; each
image is fetched only by the ranks that train on it (counted by the store); a killed rank fails
the run instead of hanging it; the data path works as a plain ``torch.utils.data`` dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from mmstore_client import StoreClient
from mmstore_client.render import Renderer
from mmstore_client.samples import write_samples
from mmstore_trainer import StepDataset, TrainConfig, Trainer, read_metrics
from mmstore_trainer.sharding import assign_indices
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file
from support import FetchingRenderer
from test_trainer_data import make_sample, upload
from torch.distributed.tensor import DTensor

TORCHRUN = Path(sys.executable).parent / "torchrun"
BLOB_GET = {"route": "/v1/blobs/{digest}", "method": "GET", "status": "200"}


def torchrun(nproc: int, args: list[str], log: Path) -> subprocess.Popen:
    """``torchrun --nproc-per-node N -m mmstore_trainer.cli train ARGS`` as its own process group."""
    argv = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc)]
    argv += ["-m", "mmstore_trainer.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    out = log.open("wb")
    return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    """torchrun's exit code; past ``timeout``, the ranks' Python stacks (SIGABRT, faulthandler)
    go to the log and the test fails with it: a hang is a failure, never a stuck test."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            os.kill(int(child), signal.SIGABRT)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"torchrun hung for {timeout}s:\n{log.read_text()[-8000:]}") from None


def blob_gets(store_url: str) -> float:
    """The store's count of successful blob GETs (its /metrics)."""
    text = httpx.get(f"{store_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mmstore_requests_total" and all(
                sample.labels.get(k) == v for k, v in BLOB_GET.items()
            ):
                return sample.value
    return 0.0


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def shared_batch(tiny_qwen2_vl, store, tmp_path_factory):
    """Two global steps of 4 samples: in each, two samples share an image and hold less than half
    the step's tokens (so keeping them on one rank costs no balance); the others have an image of
    their own or none. No image is used in both steps. Advantages of both signs."""
    with StoreClient(store.url) as client:
        renderer = FetchingRenderer(Renderer.from_pretrained(tiny_qwen2_vl), client)
        refs, _ = upload(client, "trainer-dist", [(120, 160), (200, 100), (90, 90), (160, 120)], seed=900)
        a, b, c, d = refs
        long = "The quick brown fox jumps over the lazy dog. " * 3
        samples = [
            make_sample(renderer, [a], "s0", advantages=1.0, answer="Two objects, both red."),
            make_sample(renderer, [a], "s1", advantages=-0.5, answer="Seven."),
            make_sample(renderer, [b], "s2", advantages=0.8, answer="Three squares."),
            make_sample(renderer, [], "s3", advantages=1.0, answer=long),
            make_sample(renderer, [c, d], "s4", advantages=1.0, answer="A cat and a dog."),
            make_sample(renderer, [c], "s5", advantages=-1.0, answer="None at all."),
            make_sample(renderer, [], "s6", advantages=0.5, answer=long * 3),
            make_sample(renderer, [], "s7", advantages=1.0, answer="Hello there, world!"),
        ]
    path = tmp_path_factory.mktemp("dist") / "samples.jsonl"
    write_samples(path, samples)
    return path, samples


def test_assignment_balances_tokens_groups_shared_images_and_is_seeded():
    lengths = [100, 100, 50, 300, 80, 20, 60, 90]
    digests = [["A"], ["A"], ["B"], [], ["C", "D"], ["C"], [], []]
    shares = assign_indices(lengths, digests, 2, seed=0, step=1)
    assert sorted(i for s in shares for i in s) == list(range(8))
    assert assign_indices(lengths, digests, 2, seed=0, step=1) == shares  # every rank computes the same
    rank_of = {i: r for r, s in enumerate(shares) for i in s}
    assert rank_of[0] == rank_of[1] and rank_of[4] == rank_of[5]  # shared images stay on one rank
    loads = [sum(lengths[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(lengths)  # longest-first: within one unit of each other
    # a group larger than a rank's fair share is split rather than unbalancing the step
    split = assign_indices([100, 100, 100, 10], [["X"], ["X"], ["X"], []], 2, seed=0, step=1)
    assert max(sum([100, 100, 100, 10][i] for i in s) for s in split) == 200
    # equal units: the seed (and the step) decide the ties, not the rank order
    ties = {tuple(map(tuple, assign_indices([10] * 8, [[]] * 8, 4, seed=s, step=1))) for s in range(8)}
    assert len(ties) > 1
    with pytest.raises(ValueError, match="at least 3"):
        assign_indices([1, 1], [[], []], 3, seed=0, step=1)


@pytest.mark.slow
def test_two_ranks_train_as_one_process_and_fetch_only_their_images(
    tiny_qwen2_vl, store, shared_batch, tmp_path
):
    path, samples = shared_batch
    common = dict(
        model=tiny_qwen2_vl, data=[path], store=store.url, steps=2, batch_size=4, lr=1e-3,
        token_budget=max(len(s.token_ids) for s in samples) + 8, progress=False, device="cpu",
    )  # fmt: skip
    one = TrainConfig(out=tmp_path / "one", **common)
    with Trainer(one) as trainer:
        single = trainer.run()
    assert trainer.world_size == 1 and trainer.ranks is None

    before = blob_gets(store.url)
    args = ["--model", str(tiny_qwen2_vl), "--data", str(path), "--store", store.url, "--steps", "2"]
    args += ["--batch-size", "4", "--lr", "1e-3", "--token-budget", str(common["token_budget"])]
    args += ["--no-progress", "--device", "cpu", "--out", str(tmp_path / "two")]
    proc = torchrun(2, args, tmp_path / "torchrun.log")
    assert finish(proc, tmp_path / "torchrun.log", 300) == 0, (tmp_path / "torchrun.log").read_text()[-4000:]
    assert "x 2 ranks" in (tmp_path / "torchrun.log").read_text()
    fetched = blob_gets(store.url) - before

    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    for m1, m2 in zip(single.metrics, two, strict=True):
        assert m2["samples"] == 4 and m2["trained_tokens"] == m1.trained_tokens
        assert m2["loss"] == pytest.approx(m1.loss, abs=1e-5)
        assert m2["grad_norm"] == pytest.approx(m1.grad_norm, rel=1e-4)
        assert m2["ratio_min"] == pytest.approx(m1.ratio_min, abs=1e-5)
    ckpt = tmp_path / "two" / "checkpoints" / "step-000002"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    w1, w2 = weights(single.checkpoint), weights(ckpt)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=2e-5, rtol=1e-4, msg=name)
    base = weights(tiny_qwen2_vl)
    assert any(not torch.equal(base[k], w2[k]) for k in base)  # the test can fail: it trained

    # each rank fetched exactly the images of the samples it trained on, and the store saw only that
    digests = {s.sample_id: {d.digest for d in s.descriptors} for s in samples}
    per_rank = [read_metrics(tmp_path / "two" / f"metrics.rank-{r}.jsonl") for r in range(2)]
    needed = []
    for records in per_rank:
        ids = [i for m in records for i in m["sample_ids"]]
        assert records[-1]["store_fetches"] == len(set().union(*(digests[i] for i in ids)))
        needed.append(set().union(*(digests[i] for i in ids)))
    assert sorted(i for records in per_rank for m in records for i in m["sample_ids"]) == sorted(digests)
    # the run met both ways ranks can diverge under FSDP: different micro-batch counts in a step
    # (the short rank repeats one with weight 0) and a rank with no image (the vision tower unused)
    assert any(a["micro_batches"] != b["micro_batches"] for a, b in zip(*per_rank, strict=True))
    assert any(m["images"] == 0 for records in per_rank for m in records)
    assert fetched == sum(len(n) for n in needed)
    # samples sharing an image went to one rank: every image was fetched once, by one rank
    assert not needed[0] & needed[1] and fetched == len(set().union(*digests.values()))


def test_one_rank_fsdp_steps_as_one_process_with_one_fused_optimizer_kernel(
    tiny_qwen2_vl, store, shared_batch, tmp_path
):
    """The 1-rank FSDP2 trainer (a process group of its own, made in this process) updates the
    weights as one process does, with AdamW fused in both and, under FSDP2, holding the rank's
    shards as plain tensors that share the DTensors' storage: through DTensor each list op of
    the optimizer and of clipping dispatches parameter by parameter (bench/trainer_bench.py
    measures what that cost)."""
    path, samples = shared_batch
    common = dict(
        model=tiny_qwen2_vl, data=[path], store=store.url, steps=2, batch_size=4, lr=1e-3,
        token_budget=max(len(s.token_ids) for s in samples) + 8, progress=False, device="cpu",
    )  # fmt: skip
    reports, fused = {}, {}
    for mode in ("off", "fsdp"):
        with Trainer(TrainConfig(out=tmp_path / mode, parallelism=mode, **common)) as trainer:
            reports[mode] = trainer.run()
            fused[mode] = trainer.optimizer.defaults["fused"]
            held = trainer.optimizer.param_groups[0]["params"]
            assert not any(isinstance(p, DTensor) for p in held)
            if mode == "fsdp":  # each is its parameter's local shard, the same memory
                locals_ = [p.to_local() for p in trainer.model.parameters()]
                assert [p.data_ptr() for p in held] == [t.data_ptr() for t in locals_]
            assert (trainer.ranks is not None) == (mode == "fsdp")
    assert not torch.distributed.is_initialized()  # the trainer left the group it made
    assert fused == {"off": True, "fsdp": True}
    one, rank = reports["off"], reports["fsdp"]
    for m1, m2 in zip(one.metrics, rank.metrics, strict=True):
        assert m2.loss == pytest.approx(m1.loss, abs=1e-5)
        assert m2.grad_norm == pytest.approx(m1.grad_norm, rel=1e-4)
    w1, w2 = weights(one.checkpoint), weights(rank.checkpoint)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=2e-5, rtol=1e-4, msg=name)
    base = weights(tiny_qwen2_vl)
    assert any(not torch.equal(base[k], w2[k]) for k in base)  # it trained


@pytest.mark.slow
def test_killed_rank_fails_the_run(tiny_qwen2_vl, store, shared_batch, tmp_path):
    path, _ = shared_batch
    out = tmp_path / "killed"
    args = ["--model", str(tiny_qwen2_vl), "--data", str(path), "--store", store.url, "--steps", "100000"]
    args += ["--batch-size", "4", "--no-progress", "--device", "cpu", "--out", str(out)]
    args += ["--collective-timeout-s", "60"]
    log = tmp_path / "torchrun.log"
    proc = torchrun(2, args, log)
    try:
        rank_log = out / "metrics.rank-1.jsonl"
        deadline = time.monotonic() + 300
        while not (rank_log.exists() and rank_log.read_text().count("\n") >= 2):
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "the ranks never trained"
            time.sleep(0.2)
        victim = worker_pid(proc.pid, rank=1)
        os.kill(victim, signal.SIGKILL)  # mid-run: a rank spends nearly all its time in steps
        t0 = time.monotonic()
        code = finish(proc, log, 120)  # never a hang
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code != 0 and time.monotonic() - t0 < 120
    assert "ChildFailedError" in text and "Signal 9 (SIGKILL)" in text, text[-4000:]


def worker_pid(agent: int, rank: int) -> int:
    """The pid of ``rank`` among torchrun's workers (its children), read from their environment."""
    for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(child)
    raise AssertionError(f"no worker of rank {rank} under torchrun {agent}")


def test_step_dataset_in_a_plain_pytorch_loop(tiny_qwen2_vl, store, shared_batch):
    """The README's example: each rank's steps through a DataLoader into a plain HF forward, a
    loss over the trained positions, backward and an AdamW step; together the ranks see every
    sample once, with model-ready inputs."""
    from transformers import AutoModelForImageTextToText

    path, samples = shared_batch
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_qwen2_vl), dtype=torch.float32)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    for rank in range(2):
        data = StepDataset.from_pretrained(
            tiny_qwen2_vl, [path], store.url, steps=2, batch_size=4, token_budget=512, rank=rank, world_size=2
        )
        for step in torch.utils.data.DataLoader(data, batch_size=None):
            for mb in step.micro_batches:
                logits = model(**mb.forward_kwargs(data.family), logits_to_keep=mb.logit_positions).logits[0]
                targets = mb.input_ids[0, mb.targets, None]
                new = torch.log_softmax(logits.float(), -1).gather(-1, targets)[:, 0]
                ratio = torch.exp(new - mb.old_logprobs)
                (-(mb.advantages * ratio).sum() / max(step.trained_tokens, 1)).backward()
                assert mb.position_ids.shape[:2] == (4, 1) and new.shape == mb.targets.shape
                if mb.num_images:
                    assert mb.model_inputs["image_grid_thw"].shape == (mb.num_images, 3)
            optim.step()
            optim.zero_grad()
            seen += [s.sample_id for s in step.samples]
    assert sorted(seen) == sorted(s.sample_id for s in samples)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="num_workers=0"):
        next(iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=1)))
