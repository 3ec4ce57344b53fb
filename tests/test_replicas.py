"""Several inference replicas on one store: correct on any replica, routed by nginx.

Two real replicas (vLLM CPU, tiny Qwen2-VL) are started once for the module, in parallel, on the
session's store. A 10-turn rollout whose turns alternate between them gives exactly what one
replica gives; so does a GRPO group spread over both. nginx (Debian's package, started by the
stack) in front of them hashes the affinity header and round-robins without it; the reduced smoke
loop runs through it while one replica is SIGKILLed mid-run. The last test kills a replica: keep
it last. Without nginx the tests that need it skip and say so (`apt-get install -y nginx`).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mmstore_client import AsyncStoreClient
from mmstore_client.inference import AFFINITY_HEADER, AsyncInferenceClient, GenerateRequest, SamplingOptions
from mmstore_client.offload import aoffload_messages
from mmstore_client.render import Renderer, image_refs
from mmstore_rollout import balancer as lb
from mmstore_rollout.env import ShapesEnv
from mmstore_rollout.service_metrics import scrape_replica
from mmstore_rollout.stack import Service, Stack, inference_replicas, wait_ready
from mmstore_rollout.stats import LoopStats
from mmstore_rollout.worker import SYSTEM, RolloutWorker

ROOT = Path(__file__).resolve().parent.parent
GREEDY = SamplingOptions(max_tokens=6, temperature=0.0)


def _nginx() -> str | None:
    try:
        return lb.find_nginx()
    except lb.NginxMissing:
        return None


needs_nginx = pytest.mark.skipif(_nginx() is None, reason="nginx not installed: apt-get install -y nginx")


# -- the configuration and the access log (no engines) -------------------------------------------


def test_compose_config_is_the_generated_one_and_nginx_accepts_it(tmp_path):
    conf = (ROOT / "deploy" / "nginx" / "inference.conf").read_text()
    assert conf == lb.compose_config(), "regenerate: python -m mmstore_rollout.balancer compose"
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in conf
    assert "hash $http_x_mmstore_affinity;" in conf  # one resolved name for every replica
    local = lb.http_config(["127.0.0.1:1", "127.0.0.1:2"], listen="127.0.0.1:3", access_log="off")
    assert "hash $http_x_mmstore_affinity consistent;" in local  # one server line per replica
    if _nginx() is None:
        pytest.skip("nginx not installed: apt-get install -y nginx")
    # Debian's nginx predates `resolve` (1.27.3): check the rest with a literal address
    work = tmp_path / "compose-check"
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / "tmp" / kind).mkdir(parents=True)
    http = conf.replace("inference:8800 resolve", "127.0.0.1:8800").replace(
        "listen 8800", "listen 127.0.0.1:9"
    )
    http = http.replace("/var/log/nginx/access.log", str(work / "access.log"))
    (work / "nginx.conf").write_text(lb.main_config(http, work))
    check = subprocess.run(
        [_nginx(), "-t", "-p", str(work), "-c", str(work / "nginx.conf")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


@needs_nginx
def test_balancer_starts_in_a_relative_run_folder(tmp_path, monkeypatch):
    """`make smoke REPLICAS=2` runs with the default relative ``--out runs/smoke``: nginx (which
    reads ``-c`` and every path of its configuration relative to ``-p``) must still find its files."""
    monkeypatch.chdir(tmp_path)
    with Stack(Path("runs/smoke/services")) as stack:  # as run_smoke builds it from the default --out
        replicas = ["http://127.0.0.1:9", "http://127.0.0.1:10"]
        balancer = stack.start(lb.balancer_service(replicas, stack.workdir))
        wait_ready([balancer], 30)
        assert httpx.get(f"{balancer.url}{lb.HEALTH_PATH}", timeout=5).text == "ok\n"
        assert balancer.access_log == tmp_path / "runs/smoke/services/balancer/access.log"
    assert (tmp_path / "runs/smoke/services/balancer/nginx.conf").is_file()
    assert not (tmp_path / "runs/smoke/services/balancer/runs").exists()


def test_access_log_counts_retries_and_no_replica(tmp_path):
    log = tmp_path / "access.log"
    rows = [  # as nginx writes them (escape=json)
        {"method": "POST", "uri": "/v1/generate", "status": "200", "pool": lb.AFFINITY,
         "upstream": "127.0.0.1:1", "upstream_status": "200"},
        {"method": "POST", "uri": "/v1/generate", "status": "200", "pool": lb.ROUND_ROBIN,
         "upstream": "127.0.0.1:1, 127.0.0.1:2", "upstream_status": "502, 200"},
        {"method": "POST", "uri": "/v1/generate", "status": "503", "pool": lb.ROUND_ROBIN,
         "upstream": "127.0.0.1:2, mmstore_inference_round_robin", "upstream_status": "502, 502"},
        {"method": "POST", "uri": "/v1/generate", "status": "409", "pool": lb.AFFINITY,
         "upstream": "127.0.0.1:2", "upstream_status": "409"},
        {"method": "GET", "uri": "/readyz", "status": "200",
         "upstream": "127.0.0.1:2", "upstream_status": "200"},
    ]  # fmt: skip
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    stats = lb.log_stats(log)
    assert (stats.requests, stats.retried_requests, stats.retries, stats.no_replica) == (4, 1, 1, 1)
    assert vars(stats.upstreams["127.0.0.1:1"]) == {"attempts": 2, "served": 1, "failed": 1}
    assert vars(stats.upstreams["127.0.0.1:2"]) == {"attempts": 3, "served": 2, "failed": 1}
    assert stats.by_pool == {"affinity": 2, "round-robin": 2}
    assert lb.log_stats(log, since=3).requests == 1


# -- two real replicas ---------------------------------------------------------------------------


@dataclass
class Cluster:
    store_url: str
    replicas: list[Service]
    balancer: Service | None
    stack: Stack

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]


@pytest.fixture(scope="module")
def cluster(store, tiny_qwen2_vl, tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("replicas"))
    try:
        replicas = [stack.start(r) for r in inference_replicas(tiny_qwen2_vl, store.url, stack.workdir, 2)]
        wait_ready(replicas, 600)  # both engines load at once
        balancer = None
        if _nginx():
            balancer = stack.start(lb.balancer_service([r.url for r in replicas], stack.workdir))
            wait_ready([balancer], 30)
        yield Cluster(store.url, replicas, balancer, stack)
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def renderer(tiny_qwen2_vl):
    return Renderer.from_pretrained(tiny_qwen2_vl)


class Rotating:
    """Sends request i to replica i % len: turns (and trajectories) alternate between replicas."""

    def __init__(self, urls: list[str]) -> None:
        self.clients = [AsyncInferenceClient(u) for u in urls]
        self.served: list[str] = []

    @property
    def retried(self) -> int:
        return sum(c.retried for c in self.clients)

    async def generate(self, request, *, affinity=None):
        client = self.clients[len(self.served) % len(self.clients)]
        self.served.append(client.url)
        return await client.generate(request)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))


async def _group(cluster, renderer, urls, *, seed, turns, n, sampling, run="replicas"):
    """One GRPO group (``n`` trajectories of ``turns`` turns) played by the real rollout worker."""
    stats, router = LoopStats(), Rotating(urls)
    async with AsyncStoreClient(cluster.store_url) as store:
        worker = RolloutWorker(store, router, renderer, run, stats, sampling, upload_rollouts=False)
        try:
            samples = await worker.rollout_group(seed, turns, n)
        finally:
            await router.close()
    assert stats.inference_errors == 0 and stats.placeholder_mismatches == 0 and stats.inference_retries == 0
    return samples, router.served


def _same(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids  # prompts, every image run and every completion token
        assert a.loss_mask == b.loss_mask
        assert a.pixel_digests == b.pixel_digests  # the pixels each replica handed to vLLM
        assert [d.digest for d in a.descriptors] == [d.digest for d in b.descriptors]
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


async def test_ten_turns_alternating_replicas_equal_one_replica(cluster, renderer):
    a, b = cluster.urls
    before = {u: scrape_replica(u) for u in cluster.urls}
    (alternating,), served = await _group(cluster, renderer, [a, b], seed=101, turns=10, n=1, sampling=GREEDY)
    after = {u: scrape_replica(u) for u in cluster.urls}
    assert served == [a, b] * 5
    for url, images_seen in ((a, 9), (b, 10)):  # a: turns 1,3,..,9 (images 1-9); b: all 10
        delta = {k: after[url][k] - before[url][k] for k in after[url]}
        assert delta["requests"] == delta["ok"] == 5
        # every image it lacked, fetched once by digest (a repeated image never fails on a new replica)
        assert delta["store_fetches"] == images_seen
    assert len(alternating.descriptors) == 10
    (only_a,), _ = await _group(cluster, renderer, [a], seed=101, turns=10, n=1, sampling=GREEDY)
    (only_b,), _ = await _group(cluster, renderer, [b], seed=101, turns=10, n=1, sampling=GREEDY)
    _same([alternating], [only_a])
    _same([alternating], [only_b])


async def test_grpo_group_spread_over_both_replicas_equals_one_replica(cluster, renderer):
    a, b = cluster.urls
    seeded = SamplingOptions(max_tokens=6, temperature=1.0, seed=1234)  # n distinct samples
    spread, served = await _group(cluster, renderer, [a, b], seed=102, turns=3, n=4, sampling=seeded)
    assert set(served) == {a, b} and len(served) == 1 + 4 * 2
    one, _ = await _group(cluster, renderer, [b], seed=102, turns=3, n=4, sampling=seeded)
    _same(spread, one)
    assert len({tuple(s.token_ids) for s in spread}) > 1, "the group's samples should differ"


def _logged(access_log: Path, since: int, requests: int, timeout: float = 10.0) -> lb.BalancerStats:
    """The access log's counts once it holds ``requests`` entries: nginx writes a line after the
    response has gone out, so the client can read the log before its own request is in it."""
    deadline = time.monotonic() + timeout
    stats = lb.log_stats(access_log, since=since)
    while stats.requests < requests and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = lb.log_stats(access_log, since=since)
    return stats


@needs_nginx
async def test_nginx_hashes_the_affinity_header_and_round_robins_without(cluster, renderer):
    env = ShapesEnv(103, 1)
    async with AsyncStoreClient(cluster.store_url) as store:
        (message,) = await aoffload_messages([env.message(env.turn(0))], store, "replicas")
        headers = await store.image_headers(image_refs([message]))
    rendered = renderer.render([SYSTEM, message], headers)
    body = GenerateRequest(
        prompt_token_ids=rendered.token_ids, descriptors=rendered.descriptors, sampling=GREEDY
    ).model_dump(mode="json", exclude_none=True)
    addresses = {u.split("://", 1)[1] for u in cluster.urls}
    url = cluster.balancer.url
    log_start = lb.log_length(cluster.balancer.access_log)

    def post(key: str | None) -> tuple[str, list[int]]:
        headers = {AFFINITY_HEADER: key} if key else {}
        r = httpx.post(f"{url}/v1/generate", json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        return r.headers[lb.REPLICA_HEADER], r.json()["samples"][0]["token_ids"]

    plain = [post(None) for _ in range(4)]
    assert {r for r, _ in plain} == addresses
    assert [r for r, _ in plain] == [plain[0][0], plain[1][0]] * 2  # round-robin
    keyed = [post("group-a") for _ in range(4)]
    assert len({r for r, _ in keyed}) == 1  # one key, one replica
    spread = {post(f"group-{i}")[0] for i in range(16)}
    assert spread == addresses  # keys spread over both
    assert len({tuple(ids) for _, ids in plain + keyed}) == 1  # same completion on either replica

    async with AsyncInferenceClient(url) as client:  # the client sets the header
        await client.generate(body, affinity="group-a")
    stats = _logged(cluster.balancer.access_log, log_start, 4 + 4 + 16 + 1)
    assert stats.requests == 4 + 4 + 16 + 1 and stats.retries == 0
    assert stats.by_pool == {"round-robin": 4, "affinity": 21}
    last = lb.read_log(cluster.balancer.access_log)[-1]
    assert last["affinity"] == "group-a" and last["upstream"] == keyed[0][0]


@needs_nginx
def test_smoke_through_nginx_survives_a_killed_replica(cluster, tiny_qwen2_vl, tmp_path):
    """The reduced smoke loop on 2 replicas behind nginx; one replica is SIGKILLed mid-run.

    The victim is the replica nginx hashes the first group's key to (asked beforehand with a cheap
    invalid request, which a replica answers 422 without a retry). It is killed as soon as the
    smoke's nginx has logged that group's first answered turn, so the group's later turns meet a
    dead replica (in flight or not yet sent): nginx must move them to the survivor, and count it.
    """
    from mmstore_rollout.smoke import SmokeConfig, run_smoke

    cfg = SmokeConfig(
        out=tmp_path / "run",
        model=tiny_qwen2_vl,
        store=cluster.store_url,
        replica_urls=cluster.urls,
        groups=4,
        group_size=2,
        turns=3,
        workers=2,
        max_tokens=16,
        train_steps=1,
        run="smoke-replicas",
    )
    key = f"{cfg.run}/seed0"  # RolloutWorker.affinity_key(0)
    probe = httpx.post(
        f"{cluster.balancer.url}/v1/generate", json={}, headers={AFFINITY_HEADER: key}, timeout=30
    )
    assert probe.status_code == 400, probe.text
    (victim,) = [r for r in cluster.replicas if r.url.split("://", 1)[1] == probe.headers[lb.REPLICA_HEADER]]
    killed: list[str] = []

    def kill_after_the_first_turn() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            for log in (cfg.out / "services").glob("*/access.log"):  # the smoke's own nginx
                if any(e.get("affinity") == key and e.get("status") == "200" for e in lb.read_log(log)):
                    victim.kill()
                    killed.append(victim.url)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_after_the_first_turn, daemon=True)
    killer.start()
    summary = run_smoke(cfg)
    killer.join(10)

    assert killed, "a replica was killed"
    assert summary.rollouts == 8 and summary.turns == 8 * 3
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    ids = [s["sample_id"] for s in samples]
    assert len(ids) == 8 and len(set(ids)) == 8  # none lost, none duplicated
    assert summary.inference_errors == 0 and summary.placeholder_mismatches == 0
    assert summary.balancer_retries + summary.inference_retries >= 1  # counted
    by_url = {r["url"]: r for r in summary.replicas}
    assert set(by_url) == set(cluster.urls)
    assert by_url[killed[0]]["alive"] is False
    (survivor,) = [r for r in summary.replicas if r["alive"]]
    assert survivor["requests"] > 0 and survivor["errors"] == 0
    for key in ("store_fetches", "bytes_fetched", "cache_hit_ratio", "prefix_cache_hit_ratio"):
        assert key in survivor
    assert summary.balancer["routing"].startswith("affinity")
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(saved["replicas"]) == 2 and saved["balancer_retries"] == summary.balancer_retries
