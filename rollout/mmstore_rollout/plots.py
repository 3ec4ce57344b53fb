"""The smoke loop's plots (PNG, matplotlib's Agg canvas: no display, no pyplot state).

Written next to ``summary.json``: reward per step (each GRPO group is a step here), loss per
trainer step, the inference service's image fetch latency (``timings.fetch_s`` of every
generate request), and the bytes the images cost on the wire as refs vs base64 vs
``pixel_values``. Every file is written even without data (it says so), so paths are stable.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FILES = {
    "reward": "reward_per_step.png",
    "loss": "loss_per_step.png",
    "fetch": "fetch_latency.png",
    "bytes": "bytes_on_the_wire.png",
}
_BLUE, _ORANGE, _GREY = "#2a5bd7", "#e07b20", "#8a90a0"


def _figure(title: str) -> tuple[Figure, object]:
    fig = Figure(figsize=(6.4, 3.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    return fig, ax


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes, color=_GREY)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def plot_rewards(path: Path, rewards_by_step: Mapping[int, Sequence[float]]) -> Path:
    fig, ax = _figure("reward per step (one GRPO group per step)")
    steps = sorted(rewards_by_step)
    if steps:
        for i, step in enumerate(steps):
            values = rewards_by_step[step]
            label = "samples" if i == 0 else None
            ax.scatter([step] * len(values), values, s=18, alpha=0.45, color=_GREY, linewidths=0, label=label)
        means = [statistics.fmean(rewards_by_step[s]) for s in steps]
        ax.plot(steps, means, marker="o", color=_BLUE, label="group mean")
        ax.legend(loc="best", fontsize=9)
        ax.set_ylim(min(0.0, *map(min, rewards_by_step.values())) - 0.05, max(1.0, *means) + 0.05)
    else:
        _no_data(ax, "rewards")
    ax.set_xlabel("step (group)")
    ax.set_ylabel("reward (mean over turns)")
    fig.savefig(path)
    return path


def plot_loss(path: Path, loss_per_step: Sequence[float]) -> Path:
    fig, ax = _figure("trainer loss per step")
    if loss_per_step:
        ax.plot(range(1, len(loss_per_step) + 1), loss_per_step, marker="o", color=_ORANGE)
        ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        _no_data(ax, "loss")
    ax.set_xlabel("trainer step")
    ax.set_ylabel("loss")
    fig.savefig(path)
    return path


def plot_fetch_latency(path: Path, fetch_s: Sequence[float]) -> Path:
    fig, ax = _figure("inference: image fetch + verify + decode per request")
    if fetch_s:
        ms = sorted(x * 1000 for x in fetch_s)
        bins = min(40, max(5, len(ms) // 3))
        if ms[0] > 0 and ms[-1] / ms[0] > 20:  # cache hits and cold fetches: orders of magnitude apart
            bins = [ms[0] * (ms[-1] / ms[0]) ** (i / bins) for i in range(bins + 1)]
            ax.set_xscale("log")
        ax.hist(ms, bins=bins, color=_BLUE, alpha=0.8)
        p50, p95 = ms[len(ms) // 2], ms[min(len(ms) - 1, int(0.95 * len(ms)))]
        for value, name, y, side in ((p50, "p50", 0.97, "left"), (p95, "p95", 0.90, "right")):
            ax.axvline(value, color=_ORANGE, linestyle="--", linewidth=1)
            label = f" {name} {value:.2f} ms "
            xy = ax.get_xaxis_transform()  # x in data, y in axes fraction
            box = {"facecolor": "white", "alpha": 0.85, "edgecolor": "none", "pad": 1}
            ax.text(value, y, label, color=_ORANGE, va="top", ha=side, fontsize=8, transform=xy, bbox=box)
        ax.set_ylabel(f"requests (of {len(ms)})")
    else:
        _no_data(ax, "fetch timings")
    ax.set_xlabel("timings.fetch_s (ms)")
    fig.savefig(path)
    return path


def plot_wire_bytes(path: Path, refs: int, base64: int, pixel_values: int) -> Path:
    fig, ax = _figure("bytes to inference for the images, per loop")
    names = ["refs +\ndescriptors", "base64\ndata URIs", "float32\npixel_values"]
    values = [refs, base64, pixel_values]
    bars = ax.bar(names, [max(v, 1) for v in values], color=[_BLUE, _GREY, _ORANGE])
    ax.set_yscale("log")
    for bar, value in zip(bars, values, strict=True):
        ratio = f" ({value / refs:,.0f}x)" if refs and value != refs else ""
        top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
        ax.annotate(f"{_human(value)}{ratio}", top, ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("bytes (log scale)")
    ax.margins(y=0.15)
    fig.savefig(path)
    return path


def write_plots(
    out: Path,
    *,
    rewards_by_step: Mapping[int, Sequence[float]],
    loss_per_step: Sequence[float],
    fetch_s: Sequence[float],
    bytes_refs: int,
    bytes_base64: int,
    bytes_pixel_values: int,
) -> list[Path]:
    """Write the four plots into ``out``; their paths, in a stable order."""
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_rewards(out / FILES["reward"], rewards_by_step),
        plot_loss(out / FILES["loss"], loss_per_step),
        plot_fetch_latency(out / FILES["fetch"], fetch_s),
        plot_wire_bytes(out / FILES["bytes"], bytes_refs, bytes_base64, bytes_pixel_values),
    ]
