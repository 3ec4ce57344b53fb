"""Cutting a sample to a maximum length without ever splitting an image's placeholder run.

A cut inside a run would leave the model with fewer image tokens than the image has features:
the "image features and image tokens do not match" crash, or, worse, a silently shifted image.
So a cut is moved back to the start of the run it falls in; the images from there on are
dropped together with their descriptors, spans and pixel digests. The policy:

* ``cut``: keep the longest prefix that ends before any split run (may drop trailing images);
* ``drop_sample``: a sample over the limit is not used at all.

Callers count what they truncated or dropped (the trainer reports both per run).
"""

from __future__ import annotations

from enum import StrEnum

from .samples import Sample


class TruncationPolicy(StrEnum):
    CUT = "cut"
    DROP_SAMPLE = "drop_sample"


def safe_cut(sample: Sample, max_tokens: int) -> int:
    """The largest length <= ``max_tokens`` that splits no image span."""
    cut = min(max_tokens, len(sample.token_ids))
    for span in sample.image_spans:
        if span.start < cut < span.start + span.length:
            return span.start
    return cut


def truncate_sample(sample: Sample, max_tokens: int, policy: TruncationPolicy) -> Sample | None:
    """``sample`` within ``max_tokens`` under ``policy``; None when it is dropped.

    A cut that leaves no token to train on drops the sample too (it could not contribute).
    """
    if len(sample.token_ids) <= max_tokens:
        return sample
    if policy is TruncationPolicy.DROP_SAMPLE:
        return None
    cut = safe_cut(sample, max_tokens)
    keep = sum(1 for span in sample.image_spans if span.start + span.length <= cut)
    if not any(sample.loss_mask[:cut]):
        return None
    advantages = sample.advantages[:cut] if isinstance(sample.advantages, list) else sample.advantages
    return sample.model_copy(
        update={
            "token_ids": sample.token_ids[:cut],
            "loss_mask": sample.loss_mask[:cut],
            "logprobs": sample.logprobs[:cut],
            "advantages": advantages,
            "descriptors": sample.descriptors[:keep],
            "image_spans": sample.image_spans[:keep],
            "pixel_digests": None if sample.pixel_digests is None else sample.pixel_digests[:keep],
        }
    )
