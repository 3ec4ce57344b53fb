"""The one launcher (``mmstore_rollout.stack``): what every caller relies on when a server fails
to start or is stopped. Real processes (a Python one-liner as the "server"), no vLLM."""

from __future__ import annotations

import os
import sys
import time

import pytest
from mmstore_rollout.stack import EngineOptions, Service, ServiceFailed, Stack, free_port, wait_ready

# a "server" that forks a child into its own process group, then never answers HTTP
FORKS_AND_SLEEPS = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("child", child.pid, flush=True)
time.sleep(600)
"""


def service(tmp_path, code: str, name: str = "fake") -> Service:
    return Service(name, [sys.executable, "-c", code], free_port(), tmp_path / f"{name}.log", grace=2)


def test_a_service_that_exits_fails_fast_with_its_name_status_and_log_tail(tmp_path):
    dying = service(tmp_path, "print('checkpoint folder missing'); raise SystemExit(3)", "dying")
    t = time.monotonic()
    with pytest.raises(ServiceFailed) as err:
        dying.start(timeout=60)
    assert time.monotonic() - t < 30, "failed as soon as it exited, not at the timeout"
    message = str(err.value)
    assert "dying exited with 3" in message and str(dying.log) in message
    assert "checkpoint folder missing" in message


def test_a_service_not_ready_in_time_is_named_with_its_log_and_stopped(tmp_path):
    slow = service(tmp_path, "print('still loading', flush=True); import time; time.sleep(600)", "slow")
    with pytest.raises(ServiceFailed, match=r"(?s)slow not ready after 1s.*still loading"):
        slow.start(timeout=1)
    assert not slow.alive(), "a service that failed to start is not left running"


def test_stopping_a_stack_stops_each_whole_process_group(tmp_path):
    with Stack(tmp_path) as stack:
        parent = stack.start(service(tmp_path, FORKS_AND_SLEEPS, "parent"))
        deadline = time.monotonic() + 30
        while "child" not in parent.log.read_text():
            assert time.monotonic() < deadline, parent.log_tail()
            time.sleep(0.1)
        child = int(parent.log.read_text().split()[1])
    assert not parent.alive()
    with pytest.raises(ProcessLookupError):  # the forked child is gone too
        for _ in range(50):
            os.kill(child, 0)
            time.sleep(0.1)


def test_a_killed_service_restarts_on_the_same_port(tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    argv += ["--directory", str(tmp_path)]
    server = Service("web", argv, port, tmp_path / "web.log", ready_path="/")
    try:
        server.start(timeout=30)
        first = server.proc.pid
        server.kill()
        server.start(timeout=30)
        assert server.proc.pid != first and server.url == f"http://127.0.0.1:{port}"
        wait_ready([server], 5)
    finally:
        server.stop()


def test_engine_options_become_the_flags_both_servers_take():
    options = EngineOptions(max_model_len=1024, enforce_eager=False, gpu_memory_utilization=0.4, dtype=None)
    assert options.flags() == [
        "--max-model-len",
        "1024",
        "--no-enforce-eager",
        "--gpu-memory-utilization",
        "0.4",
    ]
    assert options.settings() == {
        "max_model_len": 1024,
        "enforce_eager": False,
        "gpu_memory_utilization": 0.4,
    }
