"""Training samples from the answers of a stock vLLM server (with the ``mmstore-vllm`` plugin).

RL stacks drive stock vLLM directly: its token-in endpoint ``POST /inference/v1/generate``
(mounted by ``--enable-scale-out``; ``token_ids`` with one image pad per image plus
``content_parts`` carrying ``mmstore://`` refs) or ``/v1/chat/completions`` with
``return_token_ids``. vLLM expands each pad to the image's run and reports the expanded prompt
(and, on ``/generate``, ``mm_placeholders``), but nothing in vLLM checks that run against what the
trainer's processor will produce. The functions here build each image's descriptor from its
header (layout math, no processor, no I/O: the caller fetches the headers) and check vLLM's runs
against them token for token, so a disagreement is an error naming the image before any training.

Multi-turn with stock vLLM: vLLM's token-in path always expands every image pad it is given, so
an already expanded run of N would become 2N-1. A client bridges turn k to turn k+1 by sending
``bridge_token_ids(previous_sample, new_ids)``: the previous turn's prompt and sampled completion
with each image run collapsed to one pad, then the new messages' ids (one pad per new image),
with ``content_parts`` holding every image of the conversation so far (refs are a few dozen bytes
each; vLLM's caches key them by digest). vLLM re-expands the runs; :func:`sample_from_generate`
with ``previous=`` checks that the answer's ids start with the previous sample's ids exactly (the
sampled completion is never re-tokenized) and raises :class:`TurnBreak` naming the turn if not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .decode import ImageHeader
from .descriptor import Descriptor, ImageSpan
from .digest import make_ref
from .layouts import Layout
from .placeholders import PlaceholderMismatch, check_runs, collapse
from .render import Rendered, describe
from .samples import Sample, sample_from_rendered


class TurnBreak(ValueError):
    """Turn k+1's ids (or images) do not extend turn k's sample."""

    code = "turn_break"

    def __init__(self, message: str, turn: int) -> None:
        super().__init__(message)
        self.turn = turn


def describe_images(
    digests: Sequence[str], headers: Mapping[str, ImageHeader], layout: Layout
) -> list[Descriptor]:
    """Descriptors of ``digests`` (in prompt order) from headers the caller fetched
    (``decode.probe`` of the bytes, or of their first kilobytes)."""
    missing = [d for d in digests if d not in headers]
    if missing:
        raise KeyError(f"no header for {', '.join(missing)}: probe each image's bytes first")
    return [describe(d, headers[d], layout) for d in digests]


def content_parts(descriptors: Sequence[Descriptor]) -> list[dict[str, str]]:
    """The ``content_parts`` of a ``/inference/v1/generate`` request for these images."""
    return [{"type": "image_url", "url": make_ref(d.digest)} for d in descriptors]


def bridge_token_ids(previous: Sample, new_ids: Sequence[int]) -> list[int]:
    """The ``token_ids`` to send for the next turn: ``previous``'s ids (prompt and sampled
    completion) with each image run collapsed to its one pad, then ``new_ids``."""
    return [*collapse(previous.token_ids, previous.image_spans), *new_ids]


def check_placeholders(
    prompt_ids: Sequence[int],
    placeholders: Sequence[Mapping[str, int]] | None,
    descriptors: Sequence[Descriptor],
    image_token_id: int,
) -> list[ImageSpan]:
    """The image spans of vLLM's expanded prompt, checked against the descriptors: the runs of
    the image token (count and length) and, when vLLM reported them, its placeholder ranges
    (offset and length). Raises :class:`PlaceholderMismatch` naming the image."""
    runs = check_runs(prompt_ids, descriptors, image_token_id)
    if placeholders is None:
        return runs
    if len(placeholders) != len(descriptors):
        raise PlaceholderMismatch(
            f"vLLM reported {len(placeholders)} image placeholder ranges for {len(descriptors)} images",
            expected=len(descriptors),
            actual=len(placeholders),
        )
    for i, (run, got, desc) in enumerate(zip(runs, placeholders, descriptors, strict=True)):
        if (got["offset"], got["length"]) != (run.start, run.length):
            raise PlaceholderMismatch(
                f"image {i} ({desc.digest}): vLLM placed it at {got['offset']}+{got['length']}, "
                f"its descriptor's run is at {run.start}+{run.length}",
                image=i,
                expected=run.length,
                actual=got["length"],
            )
    return runs


def _extends(
    previous: Sample, prompt_ids: Sequence[int], descriptors: Sequence[Descriptor], turn: int
) -> None:
    n = len(previous.token_ids)
    if list(prompt_ids[:n]) != previous.token_ids:
        at = next(
            (i for i, (a, b) in enumerate(zip(prompt_ids, previous.token_ids, strict=False)) if a != b),
            min(n, len(prompt_ids)),
        )
        raise TurnBreak(
            f"turn {turn}: vLLM's prompt ({len(prompt_ids)} ids) does not start with turn {turn - 1}'s "
            f"{n} ids (first difference at {at}); send bridge_token_ids(previous, new_ids)",
            turn,
        )
    earlier = [d.digest for d in descriptors[: len(previous.descriptors)]]
    if earlier != [d.digest for d in previous.descriptors]:
        raise TurnBreak(
            f"turn {turn}: the images do not start with turn {turn - 1}'s images; "
            "send every earlier image again, in order, before the new ones",
            turn,
        )


def _sample(
    prompt_ids: Sequence[int],
    placeholders: Sequence[Mapping[str, int]] | None,
    completion_ids: Sequence[int],
    completion_logprobs: Sequence[float],
    descriptors: Sequence[Descriptor],
    *,
    image_token_id: int,
    sample_id: str,
    previous: Sample | None,
    turn: int,
    advantages: float | list[float],
    reward: float | None,
    pixel_digests: Sequence[str] | None,
) -> Sample:
    spans = check_placeholders(prompt_ids, placeholders, descriptors, image_token_id)
    token_ids = [*prompt_ids, *completion_ids]
    check_runs(token_ids, descriptors, image_token_id)  # a sampled image token is an extra run
    if len(completion_logprobs) != len(completion_ids):
        raise ValueError(
            f"{len(completion_logprobs)} logprobs for {len(completion_ids)} sampled ids: "
            "ask vLLM for the sampled tokens' logprobs "
            "(generate: sampling_params.logprobs=0; chat: logprobs=true)"
        )
    head_mask: list[bool] = []
    head_logprobs: list[float] = []
    if previous is not None:
        _extends(previous, prompt_ids, descriptors, turn)
        head_mask, head_logprobs = previous.loss_mask, previous.logprobs
    gap = len(prompt_ids) - len(head_mask)
    prompt = Rendered(list(prompt_ids), list(descriptors), spans, [*head_mask, *([False] * gap)])
    return sample_from_rendered(
        prompt.extend(completion_ids, assistant=True),
        sample_id=sample_id,
        advantages=advantages,
        logprobs=[*head_logprobs, *([0.0] * gap), *completion_logprobs],
        reward=reward,
        pixel_digests=pixel_digests,
        meta={"turn": turn, "source": "stock_vllm"},
    )


def sample_from_generate(
    answer: Mapping[str, Any],
    descriptors: Sequence[Descriptor],
    *,
    image_token_id: int,
    sample_id: str,
    previous: Sample | None = None,
    turn: int = 1,
    advantages: float | list[float] = 0.0,
    reward: float | None = None,
    pixel_digests: Sequence[str] | None = None,
    choice: int = 0,
) -> Sample:
    """A :class:`Sample` from the JSON answer of ``POST /inference/v1/generate`` (asked with
    ``return_token_ids: true`` and ``sampling_params.logprobs: 0``), whose ``content_parts`` were
    ``descriptors``' refs in order. ``previous``: the sample of the turn before (``turn - 1``)."""
    if answer.get("prompt_token_ids") is None:
        raise ValueError("the answer has no prompt_token_ids: send return_token_ids: true")
    placeholders = (answer.get("mm_placeholders") or {}).get("image", [])
    out = answer["choices"][choice]
    content = (out.get("logprobs") or {}).get("content") or []
    return _sample(
        answer["prompt_token_ids"],
        placeholders,
        out["token_ids"],
        [c["logprob"] for c in content],
        descriptors,
        image_token_id=image_token_id,
        sample_id=sample_id,
        previous=previous,
        turn=turn,
        advantages=advantages,
        reward=reward,
        pixel_digests=pixel_digests,
    )


def sample_from_chat(
    answer: Mapping[str, Any],
    descriptors: Sequence[Descriptor],
    *,
    image_token_id: int,
    sample_id: str,
    previous: Sample | None = None,
    turn: int = 1,
    advantages: float | list[float] = 0.0,
    reward: float | None = None,
    pixel_digests: Sequence[str] | None = None,
    choice: int = 0,
) -> Sample:
    """A :class:`Sample` from a ``/v1/chat/completions`` answer (JSON, e.g. the ``openai``
    package's ``response.model_dump()``) asked with ``return_token_ids: true`` and
    ``logprobs: true``. Chat reports no placeholder ranges: the image runs of its
    ``prompt_token_ids`` are checked against ``descriptors`` (the message images, in order).
    With ``previous``, the conversation's chat template must reproduce the earlier sampled ids
    (it re-tokenizes the assistant's text), which :class:`TurnBreak` reports when it does not;
    the generate endpoint with :func:`bridge_token_ids` never re-tokenizes."""
    if answer.get("prompt_token_ids") is None:
        raise ValueError("the answer has no prompt_token_ids: send return_token_ids: true")
    out = answer["choices"][choice]
    content = (out.get("logprobs") or {}).get("content") or []
    return _sample(
        answer["prompt_token_ids"],
        None,
        out["token_ids"],
        [c["logprob"] for c in content],
        descriptors,
        image_token_id=image_token_id,
        sample_id=sample_id,
        previous=previous,
        turn=turn,
        advantages=advantages,
        reward=reward,
        pixel_digests=pixel_digests,
    )
