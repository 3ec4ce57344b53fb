"""The trainer's configuration: one pydantic model, shared by the CLI and the Python API.

The CLI maps each option to a field (and reads ``MMSTORE_TRAINER_<FIELD>`` environment
variables through typer), so a smoke loop calling :func:`mmstore_trainer.train` and a person
running ``mmstore-trainer train`` configure exactly the same thing.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from mmstore_client.truncate import TruncationPolicy
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)


class MissingImagePolicy(StrEnum):
    """What to do when the store answers 404 for an image of a sample.

    ``error`` stops training (the default: a missing image usually means a GC'd run).
    ``placeholder_zero_loss`` substitutes a mid-grey image of the descriptor's exact size, so the
    geometry and token count are unchanged, and zeroes the sample's loss mask: the sample still
    passes the checks but contributes no gradient; the step metrics count it.
    """

    ERROR = "error"
    PLACEHOLDER_ZERO_LOSS = "placeholder_zero_loss"


class Parallelism(StrEnum):
    """How the run spreads over processes.

    ``auto``: FSDP2 when launched by ``torchrun`` (``WORLD_SIZE`` is set), else one process.
    ``off``: one process, no process group. ``fsdp``: FSDP2 always (outside torchrun, a world
    of one rank: the same code path as N ranks, for comparisons).
    """

    AUTO = "auto"
    OFF = "off"
    FSDP = "fsdp"


class TrainConfig(BaseModel):
    """Everything a training run needs. Paths are local; the store is reached over HTTP."""

    model_config = ConfigDict(extra="forbid")

    model: Path = Field(description="checkpoint folder: weights, config, processor and tokenizer files")
    data: list[Path] = Field(min_length=1, description="sample files (.jsonl or .parquet), read in order")
    out: Path = Field(description="output folder: metrics.jsonl and checkpoints")
    store: str = Field("http://127.0.0.1:8700", description="mmstore URL")
    store_token: str | None = Field(None, description="bearer token with the read scope")

    steps: PositiveInt = Field(1, description="optimizer steps; the data is cycled when it runs out")
    batch_size: PositiveInt = Field(8, description="samples per optimizer step")
    token_budget: PositiveInt = Field(8192, description="tokens per packed micro-batch")
    lr: PositiveFloat = Field(1e-6, description="AdamW learning rate (constant)")
    weight_decay: NonNegativeFloat = Field(0.0, description="AdamW weight decay")
    max_grad_norm: PositiveFloat | None = Field(1.0, description="gradient clipping; None: off")
    clip_eps_low: NonNegativeFloat = Field(0.2, description="ratio clipped below at 1 - eps_low")
    clip_eps_high: NonNegativeFloat = Field(0.2, description="ratio clipped above at 1 + eps_high")
    temperature: PositiveFloat = Field(
        1.0, description="the sampling temperature: logprobs are log_softmax(logits / temperature)"
    )

    mask_image_tokens: bool = Field(
        True,
        description="remove the family's image markup tokens from the policy's distribution, as inference "
        "service bans them from sampling by default (set False if rollouts used allow_image_tokens)",
    )
    strict_pixels: bool = Field(
        False,
        description="a sample whose decoded pixels differ from what inference reported is an error "
        "(otherwise counted in the step metrics as pixel_mismatches)",
    )
    max_sample_tokens: PositiveInt | None = Field(
        None, description="longer samples are cut (never inside an image's placeholder run) or dropped"
    )
    truncation: TruncationPolicy = Field(TruncationPolicy.CUT, description="cut or drop_sample")
    workers: NonNegativeInt = Field(2, description="loader threads; 0: materialize inline (sequential)")
    prefetch: PositiveInt = Field(8, description="samples materialized ahead of the step, at most")
    missing_images: MissingImagePolicy = MissingImagePolicy.ERROR

    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N")
    attn_implementation: str | None = Field(None, description="transformers' attention (default: sdpa)")
    varlen_vision_attention: bool = Field(
        True,
        description="on CUDA, a vision tower under sdpa attends over all images of a micro-batch in "
        "one variable-length flash-attention call a layer (torch.nn.attention.varlen), not one per image",
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    seed: int = Field(
        0, description="torch seed (dropout, if any) and the seed of the samples' assignment to ranks"
    )
    parallelism: Parallelism = Parallelism.AUTO
    collective_timeout_s: PositiveFloat = Field(
        600.0, description="seconds a rank waits in a collective before the run fails (a lost rank)"
    )
    save_every: NonNegativeInt = Field(0, description="checkpoint every N steps; 0: only at the end")
    save_final: bool = True
    progress: bool = Field(True, description="rich progress bar and a metrics line per step")
