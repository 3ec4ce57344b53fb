"""What the trainer must know about a model family, and the one table from layout family to it.

Generic trainer code (materialization, packing, the step) never names a model's tensor keys or
its position scheme; it asks the family. A family answers five questions:

* which tensors the image processor's output holds for one image, and its grid;
* how many image placeholder tokens that grid implies (checked against the sample's ids);
* the position ids of one sample, from the model's own function (e.g. Qwen's multimodal rope);
* how per-sample position ids concatenate so that attention does not cross samples;
* the forward kwargs of a packed micro-batch;
* which of the model's modules FSDP may shard as units of their own (modules that run in every
  forward, whatever the micro-batch holds);
* which of its attention configs attend within packed sequences given by ``cu_seqlens`` (a
  vision tower's images), so that they can run as one variable-length call
  (:mod:`mmstore_trainer.attention`).

Families register with :func:`register`, keyed by the layout family of
:mod:`mmstore_client.layouts` (the descriptor's ``family``), so the descriptor, the layout and
the trainer agree on one name. The table refuses a family claimed twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class ImageFeatures:
    """One image as the model consumes it: the processor's tensors (first dimension per patch or
    per image, concatenated across images in prompt order) and the grid the processor reports."""

    tensors: Mapping[str, torch.Tensor]
    grid: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class Family(ABC):
    """A model family's trainer-side knowledge. Built from the checkpoint's image processor."""

    layout_families: ClassVar[tuple[str, ...]]  # layout family names it serves, e.g. ("qwen2_vl",)

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    @abstractmethod
    def image_features(self, processor_output: Mapping[str, Any]) -> ImageFeatures:
        """The tensors and grid of ONE image from ``image_processor(images=[img])``'s output."""

    @abstractmethod
    def tokens_per_image(self, grid: tuple[int, ...]) -> int:
        """Image placeholder tokens the processor implies for an image of this grid."""

    @abstractmethod
    def position_ids(
        self, model: Any, input_ids: torch.Tensor, grids: Sequence[tuple[int, ...]]
    ) -> torch.Tensor:
        """Position ids of one sample (``input_ids`` 1-D), as the model computes them alone."""

    @abstractmethod
    def pack_position_ids(self, per_sample: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-sample position ids into the packed batch-of-one form, such that the
        model attends only within each sample."""

    def model_inputs(self, images: Sequence[ImageFeatures]) -> dict[str, torch.Tensor]:
        """Image tensors of a micro-batch: each key concatenated along dim 0 in image order."""
        import torch

        if not images:
            return {}
        return {key: torch.cat([im.tensors[key] for im in images]) for key in images[0].tensors}

    @abstractmethod
    def forward_kwargs(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, model_inputs: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        """Keyword arguments of ``model(...)`` for one packed micro-batch (no KV cache)."""

    def shard_units(self, model: Any) -> list[Any]:
        """Modules FSDP shards one by one (the rest is sharded with the root, gathered whole for
        each forward). Only modules that run in every forward qualify: the ranks' all-gathers
        must pair up. None by default (correct for any model, the least memory-efficient)."""
        return []

    def varlen_attention_configs(self, model: Any) -> list[Any]:
        """The configs of the model's parts whose attention transformers runs per packed sequence
        (``cu_seqlens``), e.g. a vision tower's per image. None by default."""
        return []


_FAMILIES: dict[str, type[Family]] = {}


def register(*layout_families: str) -> Callable[[type[Family]], type[Family]]:
    """Class decorator: ``cls`` is the trainer family of these layout families."""

    def add(cls: type[Family]) -> type[Family]:
        taken = [f"{f!r} ({_FAMILIES[f].__name__})" for f in layout_families if f in _FAMILIES]
        if taken:
            raise TypeError(f"{cls.__name__}: layout families already registered: {', '.join(taken)}")
        cls.layout_families = tuple(layout_families)
        _FAMILIES.update(dict.fromkeys(layout_families, cls))
        return cls

    return add


def known_families() -> list[str]:
    return sorted(_FAMILIES)


class UnsupportedFamily(ValueError):
    """A checkpoint whose layout family has no trainer family."""


def family_class(layout_family: str) -> type[Family]:
    try:
        return _FAMILIES[layout_family]
    except KeyError:
        raise UnsupportedFamily(
            f"the trainer has no family for layout family {layout_family!r}; "
            f"supported: {', '.join(known_families())} (add one in mmstore_trainer/families/)"
        ) from None
