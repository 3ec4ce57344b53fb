"""The renderer: OpenAI-style chat messages with mmstore refs -> token ids, descriptors, spans, mask.

It does what the model's HF processor does, without running any image processor: the model's
own chat template renders the text (one ``template_text`` per image), each image's
``placeholder`` is replaced by the layout's ``placeholder_text`` (its size read from the file
header), and the whole text is tokenized. So the ids equal ``processor(text, images)``'s, and the
layout's token count equals the processor's, by construction and by the parity tests.

Multi-turn bridging (:meth:`Renderer.bridge`) appends the tokens of new messages to the ids of
the previous turn *as sampled*: the sampled completion is never re-tokenized, earlier images
keep their descriptors, and turn k+1's ids start with turn k's.

The renderer does no I/O, as httpx builds requests without sending them: :func:`image_refs` says
which images a conversation needs, the caller fetches their headers with whichever store client it
holds (``StoreClient.image_headers`` or the async twin's), and ``render(messages, headers)``
returns ids, descriptors, spans and mask. Only the header of each image matters (its oriented
size): the layout places it from that alone.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import LRUCache
from .decode import ImageHeader
from .descriptor import Descriptor, ImageSpan, reject_processed
from .digest import is_ref, parse_ref
from .layouts import Layout
from .layouts.base import Placement
from .parts import media_parts
from .placeholders import PlaceholderMismatch, check_runs, expand

DESCRIPTORS_KEPT = 1 << 16  # about 1 KB each
PIECE_TOKENS_KEPT = 1 << 20  # tokens of text pieces kept by :class:`_PieceTokens` (about 40 MB)


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
    # True on tokens the assistant produced (its content and end token); None: not computed
    # (``render(..., assistant_mask=False)``, e.g. a prompt only sampled from, never trained on)
    assistant_mask: list[bool] | None
    messages: list[dict[str, Any]] = field(default_factory=list)  # what was rendered, refs only

    def extend(self, ids: Sequence[int], *, assistant: bool) -> Rendered:
        """A copy with ``ids`` appended (e.g. a sampled completion, ``assistant=True``)."""
        return Rendered(
            [*self.token_ids, *ids],
            list(self.descriptors),
            list(self.image_spans),
            _extend_mask(self.assistant_mask, [assistant] * len(ids)),
            list(self.messages),
        )


def _extend_mask(mask: list[bool] | None, more: list[bool]) -> list[bool] | None:
    return None if mask is None else [*mask, *more]


def image_refs(messages: Sequence[dict[str, Any]]) -> list[str]:
    """The digests of the image parts of ``messages``, in the order the chat template emits them.

    Refused by name (``RenderError``): a video part (``video_unsupported``: no layout places
    videos, and dropping one silently would change what the model sees), an image nested anywhere
    but a message's ``content`` list (``image_outside_content``: no template emits it there), and an
    image URL that is not an mmstore ref (``not_a_ref``: offload first). Processed payloads are
    refused first (:func:`~mmstore_client.descriptor.reject_processed`), as :meth:`Renderer.render`
    refuses them.
    """
    reject_processed(list(messages), "$messages")
    return _refs(messages)


def _refs(messages: Sequence[dict[str, Any]]) -> list[str]:
    """:func:`image_refs` of messages already checked for processed payloads."""
    images, videos = media_parts(list(messages))
    if videos:
        raise RenderError(f"{videos[0]}: video parts are not supported (images only)", "video_unsupported")
    digests = []
    for part in images:
        if not part.in_content:
            raise RenderError(
                f"{part.where}: an image outside a message's content list is not rendered by chat templates",
                "image_outside_content",
            )
        if not is_ref(part.url):
            raise RenderError(f"{part.where}: image URL is not an mmstore ref (offload first)", "not_a_ref")
        digests.append(parse_ref(part.url))
    return digests


def describe(digest: str, header: ImageHeader, layout: Layout) -> Descriptor:
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


# apply_chat_template's own arguments: a template kwarg of the same name would override them
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "messages", "tools", "documents", "chat_template", "tokenize", "add_generation_prompt",
     "continue_final_message", "return_dict", "return_tensors", "padding", "truncation", "max_length"}
)  # fmt: skip


@dataclass(frozen=True)
class TemplateOptions:
    """What a render passes to the chat template besides the messages."""

    tools: list[dict[str, Any]] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, tools: Sequence[dict[str, Any]] | None, kwargs: Mapping[str, Any] | None) -> TemplateOptions:
        if clash := sorted(_RESERVED_TEMPLATE_KWARGS & set(kwargs or {})):
            raise RenderError(
                f"chat_template_kwargs may not set {', '.join(clash)}: they are the renderer's own arguments",
                "invalid_template_option",
            )
        return cls(list(tools) if tools else None, dict(kwargs or {}))


def _splits_added_tokens(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is an HF fast tokenizer that splits its added tokens (the chat markup,
    the image placeholder) out of a text first and tokenizes each piece between them on its own:
    one whose added tokens strip no whitespace and match no single words. Then a text's ids are
    its pieces' ids in order (:class:`_PieceTokens`)."""
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if getattr(tokenizer, "backend_tokenizer", None) is None or not added:
        return False
    return not any(t.lstrip or t.rstrip or t.single_word for t in added.values())


# a text around every added token: whitespace runs, accents (combining and composed), digits, words
_PIECES_PROBE = ("Hello,  world!\n\n", " e\u0301t\u00e9 ", "12345 x", "\t\n  ", "assistant\n", "")


class _PieceTokens:
    """A text's ids from its pieces' ids, each piece's kept: where :func:`_splits_added_tokens`.

    A conversation's pieces (the text between two chat markup tokens: a message's role line, its
    text, ...) come again in every later request of the conversation, so only the new messages'
    pieces are tokenized: a render from scratch at turn 20 (2 images a turn, 4.9 k characters of
    template text) tokenized all of it each time, and the time grew with the turn. ``of`` checks
    the rule once, on a probe text around every added token, against the tokenizer's own encoding.
    """

    def __init__(self, tokenizer: Any, split: re.Pattern[str], added: dict[str, int]) -> None:
        self.tokenizer, self.split, self.added = tokenizer, split, added
        self.kept: LRUCache[str, list[int]] = LRUCache(PIECE_TOKENS_KEPT, cost=len)

    @classmethod
    def of(cls, tokenizer: Any) -> _PieceTokens | None:
        if not _splits_added_tokens(tokenizer):
            return None
        tokens = tokenizer.added_tokens_decoder.values()
        if tokenizer.backend_tokenizer.normalizer is not None and any(t.normalized for t in tokens):
            return None  # such tokens are matched in the normalized text, not in the text itself
        added = {t.content: i for i, t in tokenizer.added_tokens_decoder.items()}
        # longest first: at one position the longest added token matches, as the tokenizer's does
        split = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")")
        probe = "".join(f"{text}{token}" for token in added for text in _PIECES_PROBE)
        if cls(tokenizer, split, added).encode(probe) != tokenizer.encode(probe, add_special_tokens=False):
            return None
        return cls(tokenizer, split, added)  # the probe's pieces are not kept

    def encode(self, text: str) -> list[int]:
        """``tokenizer.encode(text, add_special_tokens=False)``, piece by piece."""
        ids: list[int] = []
        for i, piece in enumerate(self.split.split(text)):
            if i % 2:  # an added token
                ids.append(self.added[piece])
            elif piece:
                known = self.kept.get(piece)
                if known is None:
                    known = self.tokenizer.encode(piece, add_special_tokens=False)
                    self.kept.put(piece, known)
                ids.extend(known)
        return ids


class Renderer:
    """Renders for one model: its tokenizer (with chat template) and its image layout.

    ``tools`` and ``chat_template_kwargs`` (e.g. ``enable_thinking``, ``add_vision_id``) go to the
    chat template as ``apply_chat_template`` passes them, on every render and bridge.
    """

    def __init__(self, tokenizer: Any, layout: Layout) -> None:
        self.tokenizer = tokenizer
        self.layout = layout
        vocab = tokenizer.get_vocab()
        self.image_token_id = vocab[layout.image_token]
        self.eos_token: str = tokenizer.eos_token
        self.eos_token_id: int = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        self._descriptors: LRUCache[tuple[str, ImageHeader], Descriptor] = LRUCache(DESCRIPTORS_KEPT)
        self._pieces = _PieceTokens.of(tokenizer)
        # whether the placeholder is one token that the tokenizer never merges with its neighbours
        # (an added token, split out before the rest is tokenized): see _expands_by_repeat
        twice = layout.placeholder * 2
        self._placeholder_atomic = (
            layout.placeholder == layout.image_token
            and tokenizer.encode(f"a{twice}b", add_special_tokens=False).count(self.image_token_id) == 2
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Renderer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if tokenizer.chat_template is None:
            from transformers import AutoProcessor

            tokenizer.chat_template = AutoProcessor.from_pretrained(str(model_dir)).chat_template
        return cls(tokenizer, Layout.from_pretrained(model_dir))

    # -- descriptors -----------------------------------------------------------------------
    def describe(self, digest: str, header: ImageHeader) -> Descriptor:
        """The descriptor of one image: its header's oriented size through the layout.

        Kept by (digest, header): every request of a conversation names every earlier image again,
        and building a descriptor (placement, layout config, validation) costs ~35 us, 1.4 ms a
        request at 40 images. Descriptors are frozen, so sharing one is safe."""
        key = (digest, header)
        known = self._descriptors.get(key)
        if known is None:
            known = describe(digest, header, self.layout)
            self._descriptors.put(key, known)
        return known

    # -- text -> ids -----------------------------------------------------------------------
    @functools.cached_property
    def renders_tools(self) -> bool:
        """Whether the chat template puts ``tools`` into the prompt: a one-message conversation
        rendered with a tool and without one gives different texts. A template that ignores tools
        would drop them silently, so a render with tools is refused instead (``tools_unsupported``)."""
        probe = [{"role": "user", "content": "Hello."}]
        tool = {
            "type": "function",
            "function": {
                "name": "probe",
                "description": "Probe.",
                "parameters": {"type": "object", "properties": {}},
            },
        }

        def text(tools: list[dict[str, Any]] | None) -> str | None:
            try:
                return self.tokenizer.apply_chat_template(probe, tools=tools, tokenize=False)
            except Exception:  # a template that fails on the probe: let the real render say why
                return None

        with_tools, without = text([tool]), text(None)
        return with_tools is None or with_tools != without

    def prompt_text(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The chat template's text, one ``placeholder`` per image: what a token-in client sends a
        stock vLLM (which expands each placeholder itself) and what HF processors take."""
        return self._template(
            messages, add_generation_prompt, TemplateOptions.of(tools, chat_template_kwargs)
        )

    def _template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool, options: TemplateOptions
    ) -> str:
        """The template's text; a template that fails on these messages is a ``RenderError``
        (``template_error``), not a crash: e.g. a text-only template (Qwen2.5-VL's old
        ``tokenizer_config.json`` one) given image parts, or its own ``raise_exception``."""
        from jinja2 import TemplateError

        if options.tools and not self.renders_tools:
            raise RenderError(
                "tools were given, but the model's chat template does not render them (it gives the "
                "same text with and without tools, as Qwen2-VL's and Qwen2.5-VL's processor templates "
                "do), so the model would never see them: send no tools, or serve a checkpoint whose "
                "template defines tool use",
                "tools_unsupported",
            )
        try:
            return self.tokenizer.apply_chat_template(
                _template_messages(messages),
                tools=options.tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **options.kwargs,
            )
        except (TemplateError, TypeError) as exc:
            raise RenderError(
                f"the model's chat template cannot render these messages ({type(exc).__name__}: {exc}); "
                "a text-only template takes string contents only",
                "template_error",
            ) from None

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
        ids = self._compact_expanded(text, descriptors) if self._expands_by_repeat(descriptors) else None
        if ids is None:
            expanded = pieces[0]
            for desc, piece in zip(descriptors, pieces[1:], strict=True):
                expanded += self.layout.placeholder_text(Placement(desc.grid, desc.num_tokens)) + piece
            ids = self.tokenizer.encode(expanded, add_special_tokens=False)
        spans = self._spans(ids, descriptors, offset)
        return ids, spans

    def _expands_by_repeat(self, descriptors: list[Descriptor]) -> bool:
        """Whether every image's text is its placeholder repeated ``num_tokens`` times.

        Then the tokenization of the expanded text is that of the compact one (one placeholder
        per image) with each placeholder repeated: the compact text is tokenized and its
        placeholders repeated, and a prefix's expanded length (the assistant mask's boundaries)
        is its compact length plus ``num_tokens - 1`` per image. Tokenizing the expanded text
        (a 1280x720 image is 1196 tokens for Qwen2-VL-2B) for the whole conversation and for
        every assistant prefix made a render from scratch quadratic in the conversation: 5.8 s
        for 20 turns of 2 images (33 k tokens) on a 2-core CPU, 0.3 s with this.
        """
        p = self.layout.placeholder
        return self._placeholder_atomic and all(
            self.layout.placeholder_text(Placement(d.grid, d.num_tokens)) == p * d.num_tokens
            for d in descriptors
        )

    def _tokenize(self, text: str) -> list[int]:
        """``text``'s ids: from its pieces' kept ids where :class:`_PieceTokens` applies."""
        if self._pieces is not None:
            return self._pieces.encode(text)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _compact_expanded(self, text: str, descriptors: list[Descriptor]) -> list[int] | None:
        """The expanded ids from the compact text's tokenization (see _expands_by_repeat); None
        where its placeholder ids do not pair up with ``descriptors`` (the caller then expands)."""
        image = self.image_token_id
        expanded = expand(self._tokenize(text), image, [[image] * d.num_tokens for d in descriptors])
        return expanded[0] if expanded is not None else None

    def _check_emitted(self, messages: Sequence[dict[str, Any]], options: TemplateOptions) -> None:
        """Refuse images the chat template leaves out (e.g. a system message's, in templates that
        write only its text), naming the first message whose images are missing: dropping them
        would change what the model sees without a word."""
        placeholder = self.layout.placeholder
        for k in range(len(messages)):
            expected = len(image_refs(messages[: k + 1]))
            if self._template(messages[: k + 1], False, options).count(placeholder) < expected:
                role = messages[k].get("role")
                raise RenderError(
                    f"messages[{k}] ({role}): the chat template does not render images in this message",
                    "image_not_rendered",
                )

    def _spans(self, ids: list[int], descriptors: list[Descriptor], offset: int) -> list[ImageSpan]:
        try:
            runs = check_runs(ids, descriptors, self.image_token_id)
        except PlaceholderMismatch as exc:
            raise RenderError(str(exc), exc.code) from exc
        return [ImageSpan(start=offset + r.start, length=r.length) for r in runs]

    def _assistant_mask(
        self,
        messages: Sequence[dict[str, Any]],
        text: str,
        ids: list[int],
        descriptors: list[Descriptor],
        options: TemplateOptions,
    ) -> list[bool]:
        """True on each assistant message's tokens (content, reasoning, tool calls) and its end
        token, False elsewhere.

        Each boundary is the length of a prefix's rendering; a prefix's images are the first of
        ``descriptors``, so no image is placed again. A prefix's pieces are the whole text's (kept
        from its tokenization, :class:`_PieceTokens`) but for its last one: tokenizing every prefix
        whole made a render from scratch quadratic in the conversation (42 ms of 47 at 20 turns of
        33 k tokens). What remains per assistant message is the template pass of its prefixes.
        """
        mask = [False] * len(ids)
        if not any(m.get("role") == "assistant" for m in messages):
            return mask
        compact = self._expands_by_repeat(descriptors)
        # images before each message, counted once (not by walking every prefix)
        before = [0]
        for message in messages:
            before.append(before[-1] + len(_refs([message])))
        extra = [0]  # tokens the first i images add to their placeholders
        for d in descriptors:
            extra.append(extra[-1] + d.num_tokens - 1)

        def prefix_len(k: int, add_generation_prompt: bool) -> int:
            if k == 0:
                return 0
            prefix = self._template(messages[:k], add_generation_prompt, options)
            if compact:
                return len(self._tokenize(prefix)) + extra[before[k]]
            return len(self._encode(prefix, descriptors[: before[k]], 0)[0])

        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            start, end = prefix_len(k, True), prefix_len(k + 1, False)
            seg = ids[start:end]
            stop = seg.index(self.eos_token_id) + 1 if self.eos_token_id in seg else len(seg)
            for t in range(start, start + stop):
                mask[t] = True
        return mask

    def _describe_all(self, digests: Sequence[str], headers: Mapping[str, ImageHeader]) -> list[Descriptor]:
        missing = [d for d in dict.fromkeys(digests) if d not in headers]
        if missing:
            raise RenderError(
                f"no header given for {', '.join(missing)}: fetch the headers image_refs() names first",
                "missing_header",
            )
        return [self.describe(d, headers[d]) for d in digests]

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        headers: Mapping[str, ImageHeader],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        assistant_mask: bool = True,
    ) -> Rendered:
        """Render a whole conversation (images must be refs, ``headers`` holds each one's header).

        ``assistant_mask=False`` leaves the mask out (``None``): it costs a template pass and a
        tokenization per assistant message (quadratic in the conversation: 42 ms of a 47 ms render
        at 20 turns), and a prompt that is only sampled from (the OpenAI endpoint's) needs none.
        """
        refs = image_refs(messages)  # processed payloads refused first
        options = TemplateOptions.of(tools, chat_template_kwargs)
        descriptors = self._describe_all(refs, headers)
        text = self._template(messages, add_generation_prompt, options)
        if text.count(self.layout.placeholder) < len(descriptors):
            self._check_emitted(messages, options)
        ids, spans = self._encode(text, descriptors, 0)
        mask = self._assistant_mask(messages, text, ids, descriptors, options) if assistant_mask else None
        return Rendered(ids, descriptors, spans, mask, [dict(m) for m in messages])

    def bridge(
        self,
        previous: Rendered,
        new_messages: Sequence[dict[str, Any]],
        headers: Mapping[str, ImageHeader],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> Rendered:
        """Append ``new_messages`` to ``previous`` (whose ids end with a sampled completion).

        ``previous.messages`` must end with the assistant message of that completion (its text is
        only used to find where the template continues). The earlier ids, the sampled ones
        included, are kept exactly; only the new messages' text is tokenized. ``headers`` needs
        only the new messages' images; ``tools`` and ``chat_template_kwargs`` must be the ones the
        previous turn was rendered with.
        """
        new_refs = image_refs(new_messages)  # processed payloads refused first
        options = TemplateOptions.of(tools, chat_template_kwargs)
        history = previous.messages
        full = self._template([*history, *new_messages], add_generation_prompt, options)
        before = self._template(history, False, options)
        cut = before.rfind(self.eos_token)
        if cut < 0 or not full.startswith(before[:cut]):
            raise RenderError(
                "the chat template does not extend the previous turn's text (templates that drop earlier "
                "reasoning, as Qwen3's thinking ones on a new user message, do this): render from scratch "
                "instead (the endpoint: mmstore.bridge=false)",
                "bridge_failed",
            )
        ended = bool(previous.token_ids) and previous.token_ids[-1] == self.eos_token_id
        suffix = full[cut + len(self.eos_token) if ended else cut :]
        new_descriptors = self._describe_all(new_refs, headers)
        if suffix.count(self.layout.placeholder) < len(new_descriptors):
            self._check_emitted([*history, *new_messages], options)
        ids, spans = self._encode(suffix, new_descriptors, len(previous.token_ids))
        return Rendered(
            [*previous.token_ids, *ids],
            [*previous.descriptors, *new_descriptors],
            [*previous.image_spans, *spans],
            _extend_mask(previous.assistant_mask, [False] * len(ids)),
            [*history, *(dict(m) for m in new_messages)],
        )
