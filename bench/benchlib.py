"""Helpers shared by the benchmark scripts of this folder (``python bench/<name>.py``).

Each script is run as a file, so Python puts this folder first on ``sys.path`` and
``from benchlib import ...`` needs no package and no path juggling (``make bench`` runs them the
same way). What lives here is what the scripts had each written for themselves: the machine
description and load average stamped into every section, rewriting one marked section of
``bench/RESULTS.md``, the engine settings of the servers they compare and the cleanup of those
servers (started by the project's launcher, :mod:`mmstore_rollout.stack`) on any exit, and the
table and CLI boilerplate. The measurements and each section's wording stay in the scripts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from mmstore_rollout.stack import EngineOptions, Stack, on_gpu
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"

# A fixed width when piped (make bench | tee): rich would otherwise wrap the tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 170)


# --------------------------------------------------------------------------- CLI


def make_app(doc: str | None) -> typer.Typer:
    """The scripts' Typer app: ``--help`` shows the first paragraph of the module docstring."""
    return typer.Typer(add_completion=False, help=(doc or "").split("\n\n")[0])


# The options most scripts share, with the help texts they already had (``--help`` unchanged).
OutputOption = Annotated[Path, typer.Option(help="results file (section between the markers)")]
WriteOption = Annotated[bool, typer.Option(help="rewrite the results file")]
KeepTmpOption = Annotated[bool, typer.Option(help="keep the temporary directory (logs, store root)")]


def add_to_path(*subdirs: str) -> None:
    """Put checkout folders (``clients``, ``trainer``, ...) first on ``sys.path``.

    So that a script also runs from a checkout whose venv lacks a workspace member; a folder
    already on the path is left where it is.
    """
    for sub in reversed(subdirs):
        if str(ROOT / sub) not in sys.path:
            sys.path.insert(0, str(ROOT / sub))


# --------------------------------------------------------------------------- machine


def utc_now() -> str:
    """The date stamped into every section, to the minute: runs on a shared machine are compared."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def cpu_model(default: str = "?") -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``default`` where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return default


def machine() -> dict[str, str]:
    """What the numbers were measured on, for the ``Machine:`` line of a section.

    ``nproc`` is the CPUs this process may run on (its affinity), which on a shared or pinned
    machine is what the servers and the client actually share; never raises (``?`` instead).
    """
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "date": utc_now(),
        "gpu": gpu_name(),
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu_model(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def gpu_name() -> str:
    """The GPU the engines run on (``nvidia-smi``'s name and memory), or ``""`` without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    name, mem, driver = (x.strip() for x in out.splitlines()[0].split(","))
    return f"{name} ({mem}, driver {driver})"


def loadavg() -> str:
    """The 1/5/15-minute load averages, recorded before and after a run: the machine is shared,
    and a loaded machine explains slow numbers."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# --------------------------------------------------------------------------- RESULTS.md


def markers(name: str) -> tuple[str, str]:
    """The HTML comments around a script's section of RESULTS.md (invisible once rendered)."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(path: Path, name: str, section: str) -> None:
    """Replace the text between the ``name`` markers of ``path`` with ``section`` (or append the
    marked section); nothing else in the file changes, so each script owns only its section.

    Written to a temporary file then renamed: an interrupted run never leaves half a file.
    """
    start, end = markers(name)
    block = f"{start}\n{section}{end}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------- tables


def rich_table(
    title: str, cols: Sequence[str], rows: Sequence[Sequence[str]], left: Collection[str]
) -> Table:
    """A console table: numbers right-aligned, the ``left`` columns (labels, notes) left-aligned."""
    t = Table(title=title)
    for c in cols:
        t.add_column(c, justify="left" if c in left else "right")
    for r in rows:
        t.add_row(*r)
    return t


def md_table(cols: Sequence[str], rows: Sequence[Sequence[str]], left: Collection[str]) -> list[str]:
    """The lines of a Markdown table, aligned as :func:`rich_table` aligns the console's."""
    align = ["---" if c in left else "---:" for c in cols]
    return [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join(align) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def med(xs: Sequence[float]) -> float:
    """The median, NaN for no values: an empty cell of a table shows ``nan`` instead of raising."""
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------- processes
# The servers are started by the project's one launcher, mmstore_rollout.stack (Service, Stack,
# the builders, wait_ready); what is the benches' own is below.


def open_env(**extra: str) -> dict[str, str]:
    """This environment without the store's auth settings (the bench clients send no token),
    plus ``extra``."""
    env = dict(os.environ, **extra)
    for k in ("MMSTORE_TOKENS", "MMSTORE_TOKENS_FILE"):
        env.pop(k, None)
    return env


def bench_engine(
    max_model_len: int = 4096, gpu_share: float = 0.4, cuda_graphs: bool | None = None
) -> EngineOptions:
    """vLLM's engine settings for every server a bench compares (the same for each of them), and
    for ``inference_bench.py``'s in-process floor.

    CPU: :meth:`EngineOptions.here <mmstore_rollout.stack.EngineOptions.here>` (float32, eager, a
    tenth of RAM). GPU: bfloat16, ``gpu_share`` of the GPU's memory for each engine (two engines
    share it). Eager unless ``cuda_graphs`` (default: ``MMSTORE_BENCH_EAGER=0``): CUDA graphs and
    torch.compile then, a slower start and a shorter floor.
    """
    if cuda_graphs is None:
        cuda_graphs = os.environ.get("MMSTORE_BENCH_EAGER", "1") == "0"
    engine = EngineOptions.here(max_model_len, cuda_graphs=cuda_graphs)
    if on_gpu():
        engine = dataclasses.replace(engine, dtype="bfloat16", gpu_memory_utilization=gpu_share)
    return engine


def engine_text(engine: EngineOptions) -> str:
    """``engine`` (:func:`bench_engine`) in words, for a section's Settings."""
    mode = "`enforce_eager`" if engine.enforce_eager else "CUDA graphs + torch.compile"
    share = ", `VLLM_CPU_KVCACHE_SPACE=1`" if not on_gpu() else " each"
    return f"{engine.dtype}, {mode}, `gpu_memory_utilization={engine.gpu_memory_utilization}`{share}"


def tiny_model() -> Path:
    """The tiny random-weight Qwen2-VL checkpoint, built on first use and kept under ``.cache/``
    (git-ignored): every script that runs vLLM or the trainer on CPU measures the same model."""
    from mmstore_trainer.tiny_model import ensure_default_tiny_model

    return ensure_default_tiny_model(ROOT)


MODELS = {"tiny": "tiny", "qwen2-vl-2b": "2b"}  # name: size of the default tiny model's family


def bench_model(name: str | None = None) -> Path:
    """The checkpoint a bench serves: ``name`` (default: ``MMSTORE_BENCH_MODEL``, else ``tiny``) is
    ``tiny`` (CPU), ``qwen2-vl-2b`` (Qwen2-VL-2B-sized random weights, bf16: for a GPU; built once
    under ``MMSTORE_BENCH_CACHE``, default ``.cache/tiny-models``, about 4.4 GB) or a checkpoint
    folder."""
    name = name or os.environ.get("MMSTORE_BENCH_MODEL", "tiny")
    if name not in MODELS:
        if not (Path(name) / "config.json").exists():
            known = " or ".join(MODELS)
            raise typer.BadParameter(f"MMSTORE_BENCH_MODEL={name!r}: not {known}, nor a checkpoint folder")
        return Path(name)
    from mmstore_trainer.tiny_model import TINY_FAMILY, TINY_MODELS_DIR, ensure_tiny_model

    size = MODELS[name]
    folder = TINY_FAMILY if size == "tiny" else f"{TINY_FAMILY}-{size}"
    cache = Path(os.environ.get("MMSTORE_BENCH_CACHE", ROOT / TINY_MODELS_DIR))
    return ensure_tiny_model(cache / folder, TINY_FAMILY, size=size)


def env_prefix() -> str:
    """The bench settings of this run's environment, as they prefix its command line."""
    names = ("MMSTORE_BENCH_MODEL", "MMSTORE_BENCH_EAGER")
    return "".join(f"{n}={os.environ[n]} " for n in names if n in os.environ)


def model_text(model: Path) -> str:
    """The checkpoint in words (parameters from its safetensors headers), for a section's Settings."""
    import json
    import math

    from safetensors import safe_open

    n = 0
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is no dict)
                n += math.prod(st.get_slice(key).get_shape())
    kind = json.loads((model / "config.json").read_text()).get("model_type", "?")
    size = f"{n / 1e9:.2f} B" if n > 1e8 else f"{n / 1e6:.1f} M"
    if n < 1e8:
        what = "the tiny random-weight Qwen2-VL (`mmstore_trainer.tiny_model`)"
    elif kind == "qwen2_vl":
        what = "a Qwen2-VL-2B-sized checkpoint with random weights (`tiny_model.build_qwen2_vl_2b`)"
    else:
        what = f"a {kind} checkpoint"
    return f"{what}, {size} parameters"


# --------------------------------------------------------------------------- cleanup


def interrupt_on(*signals: signal.Signals) -> None:
    """Turn ``signals`` into KeyboardInterrupt, so that a killed run (SIGTERM from a CI timeout,
    SIGHUP from a closed terminal) unwinds through the ``finally`` blocks that stop the servers."""

    def on_signal(signum: int, frame: object) -> NoReturn:
        raise KeyboardInterrupt

    for sig in signals:
        signal.signal(sig, on_signal)


@contextlib.contextmanager
def cleanup(stack: Stack, dirs: Sequence[Path], keep: bool, out: Console | None = console) -> Iterator[None]:
    """Around a run: on an interrupt exit with 130; always stop the servers and remove the
    temporary ``dirs`` (unless ``keep``, for their logs). ``out=None``: plain ``print``."""
    say: Callable[[str], None] = out.print if out is not None else print
    try:
        yield
    except KeyboardInterrupt:
        say("[red]interrupted[/]" if out is not None else "interrupted")
        raise typer.Exit(130) from None
    finally:
        stack.stop()
        if keep:
            say("kept " + " and ".join(map(str, dirs)))
        else:
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
