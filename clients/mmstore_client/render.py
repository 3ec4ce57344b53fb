"""The renderer: OpenAI-style chat messages with mmstore refs -> token ids, descriptors, spans, mask.

It does what the model's HF processor does, without running any image processor: the model's
own chat template renders the text (one ``template_text`` per image), each image's
``placeholder`` is replaced by the layout's ``placeholder_text`` (its size read from the file
header), and the whole text is tokenized. So the ids equal ``processor(text, images)``'s, and the
layout's token count equals the processor's, by construction and by the parity tests.

Multi-turn bridging (:meth:`Renderer.bridge`) appends the tokens of new messages to the ids of
the previous turn *as sampled*: the sampled completion is never re-tokenized, earlier images
keep their descriptors, and turn k+1's ids start with turn k's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import decode
from .descriptor import Descriptor, ImageSpan, reject_processed
from .digest import is_ref, parse_ref
from .layouts import Layout
from .layouts.base import Placement
from .placeholders import PlaceholderMismatch, check_runs


class RenderError(ValueError):
    """Messages that cannot be rendered exactly; ``code`` is machine-readable."""

    def __init__(self, message: str, code: str = "render_error") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Rendered:
    """A rendered prompt: ids with every image's placeholder run expanded."""

    token_ids: list[int]
    descriptors: list[Descriptor]
    image_spans: list[ImageSpan]
    assistant_mask: list[bool]  # True on tokens the assistant produced (its content and end token)
    messages: list[dict[str, Any]] = field(default_factory=list)  # what was rendered, refs only

    def extend(self, ids: Sequence[int], *, assistant: bool) -> Rendered:
        """A copy with ``ids`` appended (e.g. a sampled completion, ``assistant=True``)."""
        return Rendered(
            [*self.token_ids, *ids],
            list(self.descriptors),
            list(self.image_spans),
            [*self.assistant_mask, *([assistant] * len(ids))],
            list(self.messages),
        )


def image_refs(messages: Sequence[dict[str, Any]]) -> list[str]:
    """The digests of the image parts of ``messages``, in the order the chat template emits them."""
    digests = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict) or "image_url" not in part:
                continue
            url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
            if not is_ref(url):
                raise RenderError(
                    f"messages[{i}].content[{j}]: image URL is not an mmstore ref (offload first)",
                    "not_a_ref",
                )
            digests.append(parse_ref(url))
    return digests


def describe(digest: str, header: decode.ImageHeader, layout: Layout) -> Descriptor:
    """The descriptor of one image from its header (``decode.probe``) alone: no pixels, no I/O."""
    placement = layout.place(header.width, header.height)
    return Descriptor(
        digest=digest,
        mime=header.mime,
        width=header.width,
        height=header.height,
        family=layout.family,
        layout=layout.config.model_dump(mode="json"),
        fingerprint=layout.fingerprint,
        grid=placement.grid,
        num_tokens=placement.num_tokens,
    )


def _template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as HF chat templates expect them: image parts become ``{"type": "image"}``."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": "image"} if isinstance(p, dict) and "image_url" in p else p for p in content]
        out.append({**message, "content": content if content is not None else ""})
    return out


class Renderer:
    """Renders for one model: its tokenizer (with chat template) and its image layout.

    ``fetch(digest) -> bytes`` supplies image bytes (normally ``StoreClient.get``, verified and
    cached); only the header is parsed.
    """

    def __init__(self, tokenizer: Any, layout: Layout, fetch: Callable[[str], bytes]) -> None:
        self.tokenizer = tokenizer
        self.layout = layout
        self.fetch = fetch
        vocab = tokenizer.get_vocab()
        self.image_token_id = vocab[layout.image_token]
        self.eos_token: str = tokenizer.eos_token
        self.eos_token_id: int = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, fetch: Callable[[str], bytes]) -> Renderer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if tokenizer.chat_template is None:
            from transformers import AutoProcessor

            tokenizer.chat_template = AutoProcessor.from_pretrained(str(model_dir)).chat_template
        return cls(tokenizer, Layout.from_pretrained(model_dir), fetch)

    # -- descriptors -----------------------------------------------------------------------
    def describe(self, digest: str) -> Descriptor:
        """The descriptor of one image: header size (oriented) through the layout."""
        return describe(digest, decode.probe(self.fetch(digest)), self.layout)

    # -- text -> ids -----------------------------------------------------------------------
    def _template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            _template_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode(
        self, text: str, descriptors: list[Descriptor], offset: int
    ) -> tuple[list[int], list[ImageSpan]]:
        """Tokenize ``text`` whose image placeholders belong to ``descriptors`` (in order)."""
        pieces = text.split(self.layout.placeholder)
        if len(pieces) - 1 != len(descriptors):
            raise RenderError(
                f"the text has {len(pieces) - 1} image placeholders ({self.layout.placeholder}) "
                f"for {len(descriptors)} images: image special tokens inside message text are refused",
                "placeholder_mismatch",
            )
        expanded = pieces[0]
        for desc, piece in zip(descriptors, pieces[1:], strict=True):
            expanded += self.layout.placeholder_text(Placement(desc.grid, desc.num_tokens)) + piece
        ids = self.tokenizer.encode(expanded, add_special_tokens=False)
        spans = self._spans(ids, descriptors, offset)
        return ids, spans

    def _spans(self, ids: list[int], descriptors: list[Descriptor], offset: int) -> list[ImageSpan]:
        try:
            runs = check_runs(ids, descriptors, self.image_token_id)
        except PlaceholderMismatch as exc:
            raise RenderError(str(exc), exc.code) from exc
        return [ImageSpan(start=offset + r.start, length=r.length) for r in runs]

    def _assistant_mask(
        self, messages: Sequence[dict[str, Any]], ids: list[int], descriptors: list[Descriptor]
    ) -> list[bool]:
        """True on each assistant message's content tokens and its end token, False elsewhere.

        Each boundary is the length of a prefix's rendering; a prefix's images are the first of
        ``descriptors``, so no image is fetched or placed again.
        """
        mask = [False] * len(ids)
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            start = self._prefix_len(messages[:k], True, descriptors)
            end = self._prefix_len(messages[: k + 1], False, descriptors)
            seg = ids[start:end]
            stop = seg.index(self.eos_token_id) + 1 if self.eos_token_id in seg else len(seg)
            for t in range(start, start + stop):
                mask[t] = True
        return mask

    def _prefix_len(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool, descriptors: list[Descriptor]
    ) -> int:
        if not messages:
            return 0
        prefix = descriptors[: len(image_refs(messages))]
        return len(self._encode(self._template(messages, add_generation_prompt), prefix, 0)[0])

    def _render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> Rendered:
        descriptors = [self.describe(d) for d in image_refs(messages)]
        ids, spans = self._encode(self._template(messages, add_generation_prompt), descriptors, 0)
        mask = self._assistant_mask(messages, ids, descriptors)
        return Rendered(ids, descriptors, spans, mask, [dict(m) for m in messages])

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> Rendered:
        """Render a whole conversation (images must be refs)."""
        reject_processed(list(messages), "$messages")
        return self._render(messages, add_generation_prompt)

    def bridge(
        self,
        previous: Rendered,
        new_messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
    ) -> Rendered:
        """Append ``new_messages`` to ``previous`` (whose ids end with a sampled completion).

        ``previous.messages`` must end with the assistant message of that completion (its text is
        only used to find where the template continues). The earlier ids, the sampled ones
        included, are kept exactly; only the new messages' text is tokenized.
        """
        reject_processed(list(new_messages), "$messages")
        history = previous.messages
        full = self._template([*history, *new_messages], add_generation_prompt)
        before = self._template(history, False)
        cut = before.rfind(self.eos_token)
        if cut < 0 or not full.startswith(before[:cut]):
            raise RenderError("the chat template does not extend the previous turn's text", "bridge_failed")
        ended = bool(previous.token_ids) and previous.token_ids[-1] == self.eos_token_id
        suffix = full[cut + len(self.eos_token) if ended else cut :]
        new_descriptors = [self.describe(d) for d in image_refs(new_messages)]
        ids, spans = self._encode(suffix, new_descriptors, len(previous.token_ids))
        return Rendered(
            [*previous.token_ids, *ids],
            [*previous.descriptors, *new_descriptors],
            [*previous.image_spans, *spans],
            [*previous.assistant_mask, *([False] * len(ids))],
            [*history, *(dict(m) for m in new_messages)],
        )
