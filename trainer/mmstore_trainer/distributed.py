"""Training past one process: PyTorch's FSDP2 over a torch.distributed process group.

Launched by ``torchrun --nproc-per-node N mmstore-trainer train ...`` each process is a rank: it
joins the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``), on NCCL with one GPU a rank, or on gloo on the CPU (the same
code path, which is what the tests run). Everything collective is torch.distributed's own:

* the model is sharded by ``torch.distributed.fsdp.fully_shard``: each unit the family names
  (:meth:`~mmstore_trainer.families.Family.shard_units`, units that run in every forward) and
  then the root, which holds everything else (embeddings, head, vision tower), gathered as bf16
  on a GPU (float32 master weights; see :meth:`Ranks.shard`). A rank whose
  micro-batch has no image skips the vision tower; keeping the tower in the root unit, with
  unused parameters reduce-scattered as zeros, keeps every rank's collectives identical;
* gradients are *summed* across ranks: each rank's loss is divided by the step's trained tokens
  over all ranks (an ``all_reduce``) and multiplied by the world size, which FSDP's gradient
  average divides out again (a custom divide factor needs PREMUL_SUM, which gloo lacks), so the
  result is the gradient of the global token-level loss, exactly as one process computes it;
* every rank runs as many forward/backward passes as the rank with the most micro-batches (the
  extra passes repeat a micro-batch with weight 0), because FSDP's all-gathers must pair up;
* the optimizer and the gradient clipping work on each rank's shards as plain tensors
  (:meth:`Ranks.local`: views of the DTensors' local storage, so an update is the DTensor's):
  through DTensor, clipping's list ops and the fused AdamW dispatch parameter by parameter
  (measured at one rank on an H200 with the 2B model: 3% of the step, the most of FSDP2's cost
  there); the global gradient norm is then one ``all_reduce`` of the shards' squared norms
  (:meth:`Ranks.global_norm`);
* the checkpoint is one full state dict (``get_model_state_dict`` with ``full_state_dict`` and
  ``cpu_offload``) written by rank 0 alone.

The process group has a timeout (``--collective-timeout-s``) and torchrun's elastic agent stops
every rank when one dies, so a lost rank fails the run loudly instead of hanging it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from mmstore_trainer.loss import PgStats
from mmstore_trainer.metrics import StepMetrics

# Step metrics that are wall times of the step: the step takes as long as its slowest rank.
_SLOWEST = ("wait_s", "step_s")
# Step metrics every rank computes identically (not summed).
_SHARED = ("step", "lr", "grad_norm")


def launched_by_torchrun() -> bool:
    """torchrun (and every torch.distributed launcher) sets ``WORLD_SIZE`` for its workers."""
    return "WORLD_SIZE" in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Ranks:
    """This process's place in the process group, and the device it trains on. ``owns_group``:
    :meth:`join` created the group (a group the caller made is left to the caller)."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls, device: str, timeout_s: float) -> Ranks:
        """Join (or, outside a launcher, create a one-rank) process group; NCCL on CUDA, else gloo.

        ``device`` is the config's: ``auto`` and ``cuda`` give each rank the GPU of its
        ``LOCAL_RANK``; ``cpu`` trains on gloo.
        """
        cuda = device != "cpu" and (device.startswith("cuda") or torch.cuda.is_available())
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            if device.startswith("cuda:") and os.environ.get("WORLD_SIZE", "1") != "1":
                raise ValueError(
                    f"--device {device} names one GPU, but torchrun started several ranks; pass "
                    "--device cuda (each rank takes the GPU of its LOCAL_RANK)"
                )
            dev = torch.device(device if device.startswith("cuda:") else f"cuda:{local_rank}")
            torch.cuda.set_device(dev)
        else:
            dev = torch.device("cpu")
        owns = not dist.is_initialized()
        if owns:
            kwargs: dict[str, Any] = {}
            if not launched_by_torchrun():  # one rank, no launcher: a private rendezvous
                kwargs = {"init_method": f"tcp://127.0.0.1:{_free_port()}", "rank": 0, "world_size": 1}
            dist.init_process_group(
                backend="nccl" if cuda else "gloo",
                timeout=timedelta(seconds=timeout_s),
                device_id=dev if cuda else None,
                **kwargs,
            )
        return cls(dist.get_rank(), dist.get_world_size(), dev, owns)

    def leave(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # -- the model -----------------------------------------------------------------------------
    def shard(self, model: torch.nn.Module, units: list[torch.nn.Module]) -> torch.nn.Module:
        """``fully_shard`` each of ``units``, then the root (a model already sharded is kept)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if isinstance(model, FSDPModule):
            return model
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        # On a GPU each unit gathers its float32 weights as bf16 (cast once per gather, where
        # autocast would cast each weight at every matmul) and reduces gradients in float32; the
        # sharded master weights and the optimizer stay float32. On the CPU everything stays
        # float32, as one process computes it.
        if self.device.type == "cuda":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()
        # One rank's shard is the whole weight: resharding after forward would free nothing and
        # gather again for backward.
        reshard = self.world_size > 1
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        assert isinstance(model, FSDPModule)
        if hasattr(model, "set_reduce_scatter_unused_params"):
            model.set_reduce_scatter_unused_params(True)  # recurse: every unit
        elif self.world_size > 1:
            raise RuntimeError(
                f"torch {torch.__version__}'s FSDP2 has no set_reduce_scatter_unused_params: ranks "
                "whose micro-batches use different parameters would not pair their reduce-scatters; "
                "upgrade torch (the project pins 2.13) or train on one rank"
            )
        return model

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU of rank 0 (collective: every rank calls it;
        the other ranks get an empty dict)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)

    # -- the optimizer's tensors ---------------------------------------------------------------
    @staticmethod
    def local(t: torch.Tensor) -> torch.Tensor:
        """This rank's shard of DTensor ``t`` as a plain tensor sharing its storage."""
        with torch.no_grad():  # without autograd, to_local is the local tensor itself, not a copy
            return t.to_local()

    def global_norm(self, local_norm: torch.Tensor) -> torch.Tensor:
        """The 2-norm over every rank's shards from this rank's (the shards are disjoint)."""
        squares = local_norm.square()
        dist.all_reduce(squares)
        return squares.sqrt()

    # -- reductions ----------------------------------------------------------------------------
    def max_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def sum_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(t)
        return int(t.item())

    @property
    def _comm_device(self) -> torch.device:
        return self.device  # NCCL reduces CUDA tensors; gloo CPU ones

    def step_metrics(self, local: StepMetrics, stats: PgStats) -> StepMetrics:
        """The whole step's metrics from every rank's: counts and worker times summed, wall times
        the slowest rank's, the loss statistics over every rank's trained tokens."""
        fields = [f.name for f in dataclasses.fields(StepMetrics)]
        pg = dataclasses.asdict(stats)
        derived = (*_SLOWEST, *_SHARED, *PgStats().summary())
        summed = [n for n in fields if n not in derived]
        pg_sums = [pg["tokens"], pg["loss_sum"], pg["ratio_sum"], pg["clipped"]]
        sums = torch.tensor(
            [float(getattr(local, n)) for n in summed] + pg_sums,
            dtype=torch.float64,
            device=self._comm_device,
        )
        highs = torch.tensor(
            [float(getattr(local, n)) for n in _SLOWEST] + [pg["ratio_max"], -pg["ratio_min"]],
            dtype=torch.float64,
            device=self._comm_device,
        )
        dist.all_reduce(sums)
        dist.all_reduce(highs, op=dist.ReduceOp.MAX)
        s, h = sums.tolist(), highs.tolist()
        tokens, loss_sum, ratio_sum, clipped = s[len(summed) :]
        whole = PgStats(int(tokens), loss_sum, ratio_sum, -h[-1], h[-2], int(clipped))
        values: dict[str, Any] = {n: getattr(local, n) for n in _SHARED}
        for name, value in zip(summed, s, strict=False):
            values[name] = type(getattr(local, name))(value)
        values.update(zip(_SLOWEST, h, strict=False))
        values.update(whole.summary())
        return StepMetrics(**values)
