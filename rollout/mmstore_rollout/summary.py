"""What a smoke run reports: the :class:`Summary` (printed, and ``summary.json`` in the run
folder) with the invariants that prove the parts agreed, and its table on the terminal."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .stats import LoopStats

console = Console(stderr=True)  # the run's progress and status, and the summary table

# the loop's counts the summary reports as they are
LOOP_COUNTS = (
    "rollouts",
    "turns",
    "generate_requests",
    "images",
    "bytes_refs",
    "bytes_base64",
    "bytes_pixel_values",
    "placeholder_mismatches",
    "processed_payloads",
    "missing_images",
    "inference_retries",
    "inference_errors",
    "context_stops",
)


@dataclass
class Summary:
    rollouts: int = 0
    turns: int = 0
    generate_requests: int = 0
    images: int = 0
    unique_digests: int = 0
    bytes_refs: int = 0
    bytes_base64: int = 0
    bytes_pixel_values: int = 0
    placeholder_mismatches: int = 0
    processed_payloads: int = 0
    missing_images: int = 0
    inference_retries: int = 0  # re-sent by the inference client (transport error, 503)
    context_stops: int = 0  # trajectories ended before a turn that would not fit max_model_len
    inference_errors: int = 0  # generate requests that failed for good
    balancer_retries: int = 0  # attempts nginx moved to another replica (replica down or failing)
    mean_reward: float = 0.0
    store: dict = field(default_factory=dict)
    inference: dict = field(default_factory=dict)
    replicas: list[dict] = field(default_factory=list)  # per inference replica, over the rollouts
    balancer: dict = field(default_factory=dict)  # nginx's view (several replicas only)
    trainer: dict = field(default_factory=dict)
    loss_per_step: list[float] = field(default_factory=list)
    wall_s: dict[str, float] = field(default_factory=dict)
    samples_file: str = ""
    checkpoint: str = ""
    rollout_docs: int = 0  # RolloutDocs uploaded for the viewer (run "<run>.rollouts")
    viewer: str = ""  # where to look at them
    plots: list[str] = field(default_factory=list)

    def record_loop(self, stats: LoopStats) -> None:
        """The rollouts' counts (before :meth:`record_trainer`, which adds its missing images)."""
        for name in LOOP_COUNTS:
            setattr(self, name, getattr(stats, name))
        self.unique_digests = len(stats.digests)
        self.mean_reward = sum(stats.rewards) / max(1, len(stats.rewards))

    def record_trainer(self, trainer: dict) -> None:
        """The training step's figures (:func:`.training.train_on_samples`)."""
        self.trainer = trainer
        self.missing_images += int(trainer.get("missing_images", 0))
        self.loss_per_step = [s["loss"] for s in trainer.get("steps", [])]
        self.checkpoint = str(trainer.get("checkpoint", ""))


def print_summary(summary: Summary, out: Path) -> None:
    table = Table(title=f"mmstore smoke run ({out / 'summary.json'})", show_header=False)
    st, inf = summary.store, summary.inference
    ratio = summary.bytes_pixel_values / max(1, summary.bytes_refs)
    rows = [
        (
            "rollouts / turns / generate requests",
            f"{summary.rollouts} / {summary.turns} / {summary.generate_requests}",
        ),
        ("images offloaded / unique digests", f"{summary.images} / {summary.unique_digests}"),
        ("bytes to inference as refs", f"{summary.bytes_refs:,}"),
        (
            "... as base64 would have been",
            f"{summary.bytes_base64:,} ({summary.bytes_base64 / max(1, summary.bytes_refs):.0f}x)",
        ),
        ("... as pixel_values would have been", f"{summary.bytes_pixel_values:,} ({ratio:.0f}x)"),
        (
            "store: blobs created / dedup uploads",
            f"{st.get('blobs_created', 0):.0f} / {st.get('uploads_deduplicated', 0):.0f}",
        ),
        (
            "inference: store fetches / byte cache hits",
            f"{inf.get('store_fetches', 0):.0f} / {inf.get('byte_cache_hits', 0):.0f}",
        ),
        (
            "inference: vLLM prefix-cache hit tokens",
            f"{summary.inference.get('prefix_cache_hit_tokens', 0):.0f}",
        ),
        (
            "trainer: images materialized / bytes fetched",
            f"{summary.trainer.get('images', 0)} / {summary.trainer.get('fetched_bytes', 0):,}",
        ),
        ("placeholder mismatches (must be 0)", str(summary.placeholder_mismatches)),
        ("processed payloads seen (must be 0)", str(summary.processed_payloads)),
        ("missing images", str(summary.missing_images)),
        (
            "trainer pixels = inference pixels (must be all)",
            f"{summary.trainer.get('pixels_checked', 0) - summary.trainer.get('pixel_mismatches', 0)}"
            f" / {summary.trainer.get('pixels_checked', 0)}",
        ),
        (
            "inference retries: client / balancer (failover)",
            f"{summary.inference_retries} / {summary.balancer_retries}",
        ),
        ("inference errors", str(summary.inference_errors)),
        ("mean reward", f"{summary.mean_reward:.3f}"),
        ("loss per step", ", ".join(f"{x:.4f}" for x in summary.loss_per_step)),
        ("wall time (s)", ", ".join(f"{k} {v}" for k, v in summary.wall_s.items())),
        ("checkpoint", summary.checkpoint),
        ("rollout documents (viewer)", f"{summary.rollout_docs}: {summary.viewer}"),
        ("plots", "\n".join(summary.plots)),
    ]
    at = next(i for i, row in enumerate(rows) if row[0].startswith("trainer: images"))
    rows[at:at] = _replica_rows(summary)
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _replica_rows(summary: Summary) -> list[tuple[str, str]]:
    rows = []
    if summary.balancer:
        rows.append(
            (
                "inference replicas",
                f"{len(summary.replicas)} behind nginx {summary.balancer['url']}, "
                f"routing: {summary.balancer['routing']}",
            )
        )
    for r in summary.replicas:
        lb = r.get("balancer")
        routed = f"; nginx sent {lb['served']} (+{lb['failed']} failed attempts)" if lb else ""
        if not r["alive"]:
            rows.append((f"  {r['name']} ({r['url']})", f"down at the end{routed}"))
            continue
        rows.append(
            (
                f"  {r['name']} ({r['url']})" if summary.balancer else f"replica {r['name']} ({r['url']})",
                f"{r['requests']} requests, {r['errors']} errors, {r['store_fetches']} store fetches "
                f"({r['bytes_fetched']:,} B); our cache hits {_pct(r['cache_hit_ratio'])}, "
                f"vLLM prefix cache {_pct(r['prefix_cache_hit_ratio'])}{routed}",
            )
        )
    return rows
