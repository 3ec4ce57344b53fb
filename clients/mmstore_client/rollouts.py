"""Rollout metadata: one small JSON document per rollout, for people to look at (``/ui``).

A :class:`RolloutDoc` says what happened in one rollout, turn by turn: the rendered text of
each turn's prompt (the chat template's text, exactly as decoded from the ids the model saw,
with each image's placeholder run cut out and its position kept as a character offset), the
completion as sampled, the rewards, and the descriptors of the images (so the viewer can show
each image and its token count). Refs and descriptors only: processed payloads are refused
like everywhere else (the models are the descriptors' strict kind: unknown fields and
processed payloads are refused with their path).

The store keeps a document as a content-addressed blob, so uploading is idempotent and the
document's id is its digest: ``PUT /v1/runs/{run}/rollouts/{digest}`` (see the service's
``routes/rollouts.py`` for why it lives in the companion run ``<run>.rollouts``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from .descriptor import Descriptor, _Strict
from .digest import compute_digest, validate_digest
from .errors import IntegrityError

if TYPE_CHECKING:
    from .render import Rendered
    from .store import AsyncStoreClient, StoreClient

ROLLOUT_VERSION = 1
ROLLOUTS_SUFFIX = ".rollouts"  # a run's rollout documents live in the run "<run>.rollouts"
Scalar = int | float | str | bool | None


class ImageAt(_Strict):
    """An image inside a turn's prompt text: ``descriptors[index]``, placed at ``offset``."""

    index: int = Field(ge=0, description="index into the document's descriptors")
    offset: int = Field(ge=0, description="character offset in the turn's prompt text")


class RolloutTurn(_Strict):
    prompt: str = Field(description="rendered text this turn added before the completion, images cut out")
    images: list[ImageAt] = Field(default_factory=list, description="images of this turn's prompt, in order")
    completion: str = Field(description="the completion as sampled (decoded, special tokens kept)")
    completion_tokens: int = Field(ge=0)
    reward: float | None = None


class RolloutDoc(_Strict):
    version: Literal[1] = ROLLOUT_VERSION
    rollout_id: str = Field(min_length=1, max_length=200, description="the worker's id, e.g. the sample id")
    step: int | None = Field(None, description="training step or GRPO group, for ordering")
    reward: float | None = Field(None, description="the rollout's reward (what training used)")
    descriptors: list[Descriptor] = Field(default_factory=list, description="every image, in order")
    turns: list[RolloutTurn] = Field(min_length=1)
    meta: dict[str, Scalar] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _images_in_range(self) -> RolloutDoc:
        for k, turn in enumerate(self.turns):
            last = 0
            for image in turn.images:
                if image.index >= len(self.descriptors):
                    raise ValueError(
                        f"turns[{k}] names image {image.index}; the document has "
                        f"{len(self.descriptors)} descriptors"
                    )
                if not last <= image.offset <= len(turn.prompt):
                    raise ValueError(f"turns[{k}]: image offsets must be ordered and inside the prompt text")
                last = image.offset
        return self

    def encode(self) -> tuple[str, bytes]:
        """``(digest, bytes)`` of the document as uploaded (compact JSON)."""
        data = self.model_dump_json().encode()
        return compute_digest(data), data


class RolloutInfo(_Strict):
    """A stored rollout document, summarised for listings."""

    digest: str
    size: int
    rollout_id: str
    step: int | None
    reward: float | None
    turns: int
    images: int
    image_tokens: int


class RolloutPage(_Strict):
    """One page of a run's rollouts in digest order; pass ``next_cursor`` as ``cursor`` for the next."""

    run: str
    rollouts: list[RolloutInfo]
    next_cursor: str | None = None


def summarize(doc: RolloutDoc, digest: str, size: int) -> RolloutInfo:
    return RolloutInfo(
        digest=digest,
        size=size,
        rollout_id=doc.rollout_id,
        step=doc.step,
        reward=doc.reward,
        turns=len(doc.turns),
        images=len(doc.descriptors),
        image_tokens=sum(d.num_tokens for d in doc.descriptors),
    )


def rollout_turns(
    rendered: Rendered,
    marks: Sequence[tuple[int, int, int]],
    decode: Callable[[list[int]], str],
    rewards: Sequence[float | None] = (),
) -> list[RolloutTurn]:
    """Turns of a multi-turn rollout from its final :class:`~mmstore_client.render.Rendered`.

    ``marks[k] = (prompt_start, completion_start, completion_end)`` are turn k's token indexes
    (the prompt part runs from the end of the previous completion, bridging tokens included);
    ``decode`` turns ids into text (the tokenizer's, special tokens kept). Each image whose
    placeholder run starts inside a prompt part is cut out of that text and kept as an
    :class:`ImageAt`, so the viewer can put the picture where the model saw it.
    """
    ids, spans = rendered.token_ids, rendered.image_spans
    turns = []
    for k, (p0, c0, c1) in enumerate(marks):
        text, images, at = "", [], p0
        for i, span in enumerate(spans):
            if p0 <= span.start < c0:
                text += decode(ids[at : span.start])
                images.append(ImageAt(index=i, offset=len(text)))
                at = span.start + span.length
        text += decode(ids[at:c0])
        turns.append(
            RolloutTurn(
                prompt=text,
                images=images,
                completion=decode(ids[c0:c1]),
                completion_tokens=c1 - c0,
                reward=rewards[k] if k < len(rewards) else None,
            )
        )
    return turns


# The store clients' own request plumbing (retries, error mapping) is reused here, so that an
# upload behaves like every other store call; these become StoreClient methods if they stay.
def put_rollout(store: StoreClient, run: str, doc: RolloutDoc) -> RolloutInfo:
    """Upload ``doc`` for ``run`` (idempotent: same document, same digest)."""
    digest, data = doc.encode()
    r = store._request(
        "PUT", f"/v1/runs/{run}/rollouts/{digest}", content=data, headers={"content-type": "application/json"}
    )
    return RolloutInfo.model_validate_json(r.content)


async def aput_rollout(store: AsyncStoreClient, run: str, doc: RolloutDoc) -> RolloutInfo:
    """Async twin of :func:`put_rollout`."""
    digest, data = doc.encode()
    r = await store._request(
        "PUT", f"/v1/runs/{run}/rollouts/{digest}", content=data, headers={"content-type": "application/json"}
    )
    return RolloutInfo.model_validate_json(r.content)


def get_rollout(store: StoreClient, digest: str) -> RolloutDoc:
    """The document stored under ``digest``, verified by blake3 like every blob."""
    r = store._request("GET", f"/v1/rollouts/{validate_digest(digest)}")
    actual = compute_digest(r.content)
    if actual != digest:
        raise IntegrityError(digest, actual)
    return RolloutDoc.model_validate_json(r.content)


def rollouts_page(store: StoreClient, run: str, *, limit: int = 50, cursor: str | None = None) -> RolloutPage:
    params = {"limit": limit} | ({"cursor": cursor} if cursor else {})
    r = store._request("GET", f"/v1/runs/{run}/rollouts", params=params)
    return RolloutPage.model_validate_json(r.content)
