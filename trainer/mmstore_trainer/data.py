"""Materialization: a sample's image refs become the model's image tensors, verified.

For each image of a sample: fetch the bytes by digest (the shared store client verifies blake3
and caches), decode them with the one decoding rule (:func:`mmstore_client.decode.decode_rgb`),
run the checkpoint's own HF image processor, and check everything the descriptor claims
against what the processor produced:

* the descriptor's ``family`` and ``fingerprint`` equal the checkpoint's layout (else the ids
  were rendered for another processor configuration);
* the decoded size equals the descriptor's ``width`` x ``height``;
* the processor's grid equals ``descriptor.grid``;
* the sample's placeholder run for the image (:func:`mmstore_client.placeholders.check_runs`)
  is as long as the processor implies (and as ``descriptor.num_tokens``), and sits at the
  sample's ``image_spans`` entry.

Any mismatch raises :class:`MaterializationError` naming the sample, the image and both values,
so a sample whose images could not be verified is never trained on. A store 404 follows the
:class:`~mmstore_trainer.config.MissingImagePolicy`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from mmstore_client import NotFoundError, StoreClient
from mmstore_client.decode import ImageError, decode_rgb, pixel_digest
from mmstore_client.descriptor import Descriptor
from mmstore_client.layouts import Layout
from mmstore_client.layouts import from_pretrained as layout_from_pretrained
from mmstore_client.placeholders import PlaceholderMismatch, check_runs
from mmstore_client.samples import Sample
from PIL import Image

from mmstore_trainer.config import MissingImagePolicy
from mmstore_trainer.families import Family, ImageFeatures, family_for

if TYPE_CHECKING:
    from collections.abc import Sequence

PLACEHOLDER_RGB = (128, 128, 128)  # mid-grey: what a missing image is replaced by, if allowed
_FAILURES = {"missing": "is missing", "fetch": "could not be fetched", "decode": "could not be decoded"}


class MaterializationError(ValueError):
    """A sample whose images cannot be verified against its descriptors (or fetched).

    ``what`` names the check (``family``, ``fingerprint``, ``size``, ``grid``, ``num_tokens``,
    ``image_count``, ``span``, ``missing``, ``decode``, ``fetch``); ``expected`` is what the
    sample or descriptor says, ``actual`` what the store, decoder or processor gave.
    """

    def __init__(
        self,
        sample_id: str,
        image: int | None,
        digest: str | None,
        what: str,
        expected: Any,
        actual: Any,
        hint: str = "",
    ) -> None:
        where = f"sample {sample_id!r}" + (f" image {image} ({digest})" if image is not None else "")
        if what in _FAILURES:
            message = f"{where} {_FAILURES[what]}: {actual}"
        else:
            message = f"{where}: {what} mismatch: the sample says {expected}, the trainer got {actual}"
        super().__init__(message + (f"; {hint}" if hint else ""))
        self.sample_id, self.image, self.digest = sample_id, image, digest
        self.what, self.expected, self.actual = what, expected, actual


@dataclass
class MaterializedSample:
    """A verified sample with per-token tensors and its images as model tensors."""

    sample_id: str
    token_ids: torch.Tensor  # (L,) int64
    loss_mask: torch.Tensor  # (L,) bool; all False when an image was replaced by a placeholder
    advantages: torch.Tensor  # (L,) float32
    logprobs: torch.Tensor  # (L,) float32, the inference logprobs (0.0 where not sampled)
    images: list[ImageFeatures]
    missing_images: int = 0
    fetched_bytes: int = 0
    fetch_s: float = 0.0
    preprocess_s: float = 0.0
    grids: list[tuple[int, ...]] = field(default_factory=list)
    pixels_checked: int = 0  # images whose pixel digest from inference was compared
    pixel_mismatches: int = 0  # ... and differed (an error in strict mode)

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


class Materializer:
    """Turns :class:`Sample` records into :class:`MaterializedSample`; thread-safe.

    One per training run: it holds the checkpoint's image processor, layout and family, and
    the shared store client (whose byte cache and single-flight serve every loader thread).
    """

    def __init__(
        self,
        store: StoreClient,
        image_processor: Any,
        layout: Layout,
        family: Family,
        image_token_id: int,
        *,
        missing_images: MissingImagePolicy = MissingImagePolicy.ERROR,
        strict_pixels: bool = False,
    ) -> None:
        self.strict_pixels = strict_pixels
        self.store = store
        self.image_processor = image_processor
        self.layout = layout
        self.family = family
        self.image_token_id = image_token_id
        self.missing_images = MissingImagePolicy(missing_images)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        store: StoreClient,
        *,
        missing_images: MissingImagePolicy = MissingImagePolicy.ERROR,
        processor: Any | None = None,
        strict_pixels: bool = False,
    ) -> Materializer:
        """Everything from the checkpoint folder: ``AutoProcessor`` and the layout registry."""
        if processor is None:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(str(model_dir))
        layout = layout_from_pretrained(model_dir)
        image_token_id = processor.tokenizer.convert_tokens_to_ids(layout.image_token)
        family = family_for(layout.family, processor.image_processor)
        return cls(
            store,
            processor.image_processor,
            layout,
            family,
            image_token_id,
            missing_images=missing_images,
            strict_pixels=strict_pixels,
        )

    # -- checks ------------------------------------------------------------------------------
    def _check_descriptor(self, sample: Sample, i: int, desc: Descriptor) -> None:
        for what, ours in (("family", self.layout.family), ("fingerprint", self.layout.fingerprint)):
            theirs = getattr(desc, what)
            if theirs != ours:
                raise _fail(
                    sample,
                    i,
                    what,
                    theirs,
                    f"{ours} (the checkpoint's layout)",
                    hint="the sample was rendered for another model or processor configuration",
                )

    def _check_runs(self, sample: Sample) -> None:
        try:
            runs = check_runs(sample.token_ids, sample.descriptors, self.image_token_id)
        except PlaceholderMismatch as exc:
            what = "num_tokens" if exc.image is not None else "image_count"
            actual = f"{exc.actual} placeholder runs" if exc.image is None else f"a run of {exc.actual}"
            raise _fail(sample, exc.image, what, exc.expected, f"{actual} in the ids", hint=exc.hint) from exc
        for i, (run, span) in enumerate(zip(runs, sample.image_spans, strict=True)):
            if run != span:
                raise _fail(sample, i, "span", f"{span.start}+{span.length}", f"{run.start}+{run.length}")

    # -- one image ---------------------------------------------------------------------------
    def _fetch(self, sample: Sample, i: int, desc: Descriptor) -> bytes | None:
        try:
            return self.store.get(desc.digest)
        except NotFoundError as exc:
            if self.missing_images is MissingImagePolicy.ERROR:
                raise _fail(
                    sample,
                    i,
                    "missing",
                    "an image in the store",
                    "the store answered 404 not_found",
                    hint="its run was deleted or collected; to train without it, pass "
                    "--missing-images placeholder_zero_loss",
                ) from exc
            return None
        except Exception as exc:  # IntegrityError, TransportError, other API errors: never train
            raise _fail(sample, i, "fetch", "verified bytes", repr(exc)) from exc

    def _decode(self, sample: Sample, i: int, desc: Descriptor, data: bytes | None) -> Image.Image:
        if data is None:
            return Image.new("RGB", (desc.width, desc.height), PLACEHOLDER_RGB)
        try:
            img = decode_rgb(data)
        except ImageError as exc:
            raise _fail(sample, i, "decode", desc.mime, repr(exc)) from exc
        if img.size != (desc.width, desc.height):
            raise _fail(sample, i, "size", f"{desc.width}x{desc.height}", "{}x{} decoded".format(*img.size))
        return img

    def _pixels_agree(self, sample: Sample, i: int, img: Image.Image) -> bool | None:
        """Whether ``img`` is the pixels inference sampled from (None: the sample has no record)."""
        if sample.pixel_digests is None:
            return None
        ours, theirs = pixel_digest(img), sample.pixel_digests[i]
        if ours != theirs and self.strict_pixels:
            raise _fail(sample, i, "pixels", theirs + " (inference)", ours + " (trainer)")
        return ours == theirs

    def _process(self, sample: Sample, i: int, desc: Descriptor, img: Image.Image) -> ImageFeatures:
        features = self.family.image_features(self.image_processor(images=[img], return_tensors="pt"))
        if features.grid != tuple(desc.grid):
            raise _fail(sample, i, "grid", tuple(desc.grid), f"{features.grid} from the processor")
        implied = self.family.tokens_per_image(features.grid)
        span = sample.image_spans[i].length
        if implied != span or implied != desc.num_tokens:
            said = f"{span} placeholder tokens (descriptor: {desc.num_tokens})"
            raise _fail(sample, i, "num_tokens", said, f"{implied} from the processor")
        return features

    # -- one sample --------------------------------------------------------------------------
    def __call__(self, sample: Sample) -> MaterializedSample:
        """Fetch, decode, process and verify every image of ``sample``."""
        for i, desc in enumerate(sample.descriptors):
            self._check_descriptor(sample, i, desc)
        self._check_runs(sample)
        fetch_s = preprocess_s = 0.0
        nbytes = missing = checked = disagreed = 0
        images: list[ImageFeatures] = []
        for i, desc in enumerate(sample.descriptors):
            t0 = time.perf_counter()
            data = self._fetch(sample, i, desc)
            t1 = time.perf_counter()
            missing += data is None
            nbytes += len(data) if data is not None else 0
            img = self._decode(sample, i, desc, data)
            agree = None if data is None else self._pixels_agree(sample, i, img)
            checked += agree is not None
            disagreed += agree is False
            images.append(self._process(sample, i, desc, img))
            fetch_s += t1 - t0
            preprocess_s += time.perf_counter() - t1
        out = _tensors(sample, images, missing, nbytes, fetch_s, preprocess_s)
        out.pixels_checked, out.pixel_mismatches = checked, disagreed
        return out


def _fail(
    sample: Sample, image: int | None, what: str, expected: Any, actual: Any, *, hint: str = ""
) -> MaterializationError:
    digest = None if image is None else sample.descriptors[image].digest
    return MaterializationError(sample.sample_id, image, digest, what, expected, actual, hint)


def _tensors(
    sample: Sample,
    images: Sequence[ImageFeatures],
    missing: int,
    nbytes: int,
    fetch_s: float,
    preprocess_s: float,
) -> MaterializedSample:
    n = len(sample.token_ids)
    advantages = sample.advantages if isinstance(sample.advantages, list) else [sample.advantages] * n
    loss_mask = torch.tensor(sample.loss_mask, dtype=torch.bool)
    if missing:
        loss_mask.zero_()
    return MaterializedSample(
        sample_id=sample.sample_id,
        token_ids=torch.tensor(sample.token_ids, dtype=torch.long),
        loss_mask=loss_mask,
        advantages=torch.tensor(advantages, dtype=torch.float32),
        logprobs=torch.tensor(sample.logprobs, dtype=torch.float32),
        images=list(images),
        missing_images=missing,
        fetched_bytes=nbytes,
        fetch_s=fetch_s,
        preprocess_s=preprocess_s,
        grids=[im.grid for im in images],
    )
