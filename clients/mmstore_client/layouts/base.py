"""What every layout adapter is: image size in, exact grid and placeholder tokens out.

A layout adapter answers, from an image's oriented width and height alone (read from the file
header by :func:`mmstore_client.decode.probe`, never from pixels), the two questions a renderer
must answer before any processor has seen the image:

* ``grid``: the per-image geometry the family's HuggingFace image processor reports (for the
  Qwen-style families ``image_grid_thw``); each adapter's docstring says what its grid means.
* ``num_tokens``: how many ``image_token`` the processor puts into the prompt for the image.

The answer must be exact, because the renderer builds token ids ahead of inference and training,
and both check the ids against their own processor. Each adapter therefore mirrors one HF
processor (named in ``hf_processor``) rule by rule, float expression by float expression, and the
parity tests run the real processor as the oracle.

How the prompt text is built mirrors HF's ``ProcessorMixin`` too: the chat template emits
``template_text`` for each image; inside it, the one ``placeholder`` token is replaced by
``placeholder_text(placement)``. Only the ``image_token`` occurrences in that replacement count
towards ``num_tokens``; framing tokens (begin/end of image, tile tags, newlines) do not.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import blake3
from pydantic import BaseModel, ConfigDict

from mmstore_client.decode import ImageError

FINGERPRINT_HEX = 16


class LayoutRefusal(ImageError):
    """The family's processor rejects images of this size (for example a too extreme aspect ratio).

    The message names the family and the rule, so the caller can drop or re-encode the image.
    """

    code = "image_refused_by_layout"


class LayoutConfigError(ValueError):
    """A model folder or family name this package cannot turn into a layout (unknown model type,
    missing processor config, a processor setting the adapter does not mirror)."""


class LayoutConfig(BaseModel):
    """Base of the per-family processor constants: frozen, and strict about unknown keys, so a
    misspelt override fails loudly instead of silently leaving the default in place."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Placement(NamedTuple):
    """Where one image lands: the processor's geometry for it and its count of ``image_token``.

    A tuple, as cheap to build as the header read it follows (placement runs per image per turn).
    """

    grid: tuple[int, ...]
    num_tokens: int


ConfigT = TypeVar("ConfigT", bound=LayoutConfig)


class Layout(ABC, Generic[ConfigT]):
    """One model family's image layout, with its processor constants in ``config``.

    Subclasses set the class attributes below, register themselves with
    :func:`mmstore_client.layouts.registry.register`, and implement :meth:`place` and
    :meth:`placeholder_text`. Instances are immutable and compare equal by fingerprint.
    """

    family: ClassVar[str]  # e.g. "qwen2_vl"; one of the HF model types it is registered for
    hf_processor: ClassVar[str]  # the HF image processor class this adapter mirrors
    config_type: ClassVar[type[LayoutConfig]]  # the ConfigT of the subclass
    image_token: ClassVar[str]  # the token counted by Placement.num_tokens
    placeholder: ClassVar[str]  # the token the processor replaces, one per image
    template_text: ClassVar[str]  # what the stock chat template emits for one image
    # other media tokens the model must never be fed from sampled text (e.g. video placeholders)
    other_media_tokens: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ConfigT | None = None) -> None:
        config = self.config_type() if config is None else config
        if type(config) is not self.config_type:
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_type.__name__}, got {type(config).__name__}"
            )
        self._config: ConfigT = config  # type: ignore[assignment]  # checked just above
        canonical = json.dumps(
            {"family": self.family, "config": config.model_dump(mode="json")},
            sort_keys=True,
            separators=(",", ":"),
        )
        self._fingerprint = blake3.blake3(canonical.encode()).hexdigest()[:FINGERPRINT_HEX]

    @property
    def config(self) -> ConfigT:
        return self._config

    @property
    def fingerprint(self) -> str:
        """16 hex of blake3 over canonical JSON of family and config: two layouts with the same
        fingerprint place every image identically."""
        return self._fingerprint

    @abstractmethod
    def place(self, width: int, height: int) -> Placement:
        """Grid and token count for an image of this oriented size; raises :class:`LayoutRefusal`
        where the family's processor raises."""

    @abstractmethod
    def placeholder_text(self, placement: Placement) -> str:
        """The exact text the processor substitutes for one ``placeholder`` of this image."""

    @abstractmethod
    def pixel_values_elements(self, placement: Placement) -> int:
        """How many numbers the processor's ``pixel_values`` hold for this image (float32 as HF
        returns them): what shipping processed pixels instead of a ref would cost."""

    def refuse(self, rule: str) -> LayoutRefusal:
        """The refusal to raise, naming the family and the processor rule that was broken."""
        return LayoutRefusal(f"{self.family} layout ({self.hf_processor}) refuses the image: {rule}")

    @classmethod
    def overrides_from_hf(cls, image_processor: dict[str, Any], processor: dict[str, Any]) -> dict[str, Any]:
        """Config fields set by a checkpoint's saved image processor and processor kwargs.

        Both dicts are read the way transformers reads them (``preprocessor_config.json`` or the
        ``image_processor`` entry of ``processor_config.json``; top-level ``processor_config.json``
        keys). Keys the family does not mirror are ignored, as HF ignores them for sizing.
        """
        return {}

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **overrides: Any) -> Layout:
        """The layout of a checkpoint folder, dispatched on ``config.json``'s ``model_type``."""
        from mmstore_client.layouts.registry import from_pretrained

        return from_pretrained(model_dir, **overrides)

    @classmethod
    def from_config(cls, family: str, **overrides: Any) -> Layout:
        """The layout of a family (or any registered model type) with config overrides."""
        from mmstore_client.layouts.registry import from_config

        return from_config(family, **overrides)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._config!r})"
