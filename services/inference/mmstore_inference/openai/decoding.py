"""Completion ids -> what the chat endpoint answers: text, stop strings, streaming deltas, and
content / reasoning / tool calls (:class:`CompletionParser`, the family's chat format).

``stop`` strings are applied after sampling (the engine call returns finished completions): the
tokens through the one that completes a stop string are kept, as vLLM keeps them, and the text
ends before it. Streaming deltas follow vLLM's incremental detokenizing: text is held back while it
ends in an incomplete character, and nothing past a stop is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mmstore_client.chat_formats import ParsedCompletion, chat_format
from mmstore_client.inference import Completion


@dataclass
class DecodedChoice:
    index: int
    ids: list[int]  # through the token that completes a stop string
    logprobs: list[float] | None
    finish: str
    stop_reason: int | str | None
    text: str
    deltas: list[str] = field(default_factory=list)  # one per token, when streaming


class CompletionDecoder:
    """Text of sampled ids for one tokenizer (used from one thread: tokenizers are not shared)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special: dict[str, int] = tokenizer.get_added_vocab()  # "<|im_end|>" -> id, ...
        self._pieces: dict[int, str] = {}

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def piece(self, token: int) -> str:
        if (p := self._pieces.get(token)) is None:
            p = self._pieces[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return p

    def cut_at_stop(self, ids: Sequence[int], stops: Sequence[str]) -> tuple[int, str, str] | None:
        """``(tokens kept, text, stop)`` at the first token whose text completes a stop string."""
        if not stops or not any(s in self.text(ids) for s in stops):
            return None
        lo, hi = 1, len(ids)  # the shortest prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if any(s in self.text(ids[:mid]) for s in stops) else (mid + 1, hi)
        text = self.text(ids[:lo])
        pos, stop = min((text.find(s), s) for s in stops if s in text)
        return lo, text[:pos], stop

    def deltas(self, ids: Sequence[int], final: str) -> list[str]:
        """One text delta per token, concatenating to ``final``."""
        out, sent, prefix_at, read_at = [], "", 0, 0
        for i in range(1, len(ids) + 1):
            before, now = self.text(ids[prefix_at:read_at]), self.text(ids[prefix_at:i])
            delta = ""
            if len(now) > len(before) and not now.endswith("\ufffd"):
                delta, prefix_at, read_at = now[len(before) :], read_at, i
            if not final.startswith(sent + delta):
                delta = final[len(sent) : len(sent) + len(delta)] if final.startswith(sent) else ""
            sent += delta
            out.append(delta)
        if out and final.startswith(sent):
            out[-1] += final[len(sent) :]
        return out

    def choices(
        self, samples: list[Completion], text_stops: list[str], stop_ids: set[int], stream: bool
    ) -> list[DecodedChoice]:
        """Each completion's text, cut at its first stop string, with its streaming deltas."""
        out = []
        for i, s in enumerate(samples):
            ids, lps, finish = list(s.token_ids), s.logprobs, s.finish_reason
            reason: int | str | None = ids[-1] if finish == "stop" and ids and ids[-1] in stop_ids else None
            if (cut := self.cut_at_stop(ids, text_stops)) is not None:
                kept, text, reason = cut
                ids, lps, finish = ids[:kept], (lps[:kept] if lps is not None else None), "stop"
            else:
                text = self.text(ids)
            deltas = self.deltas(ids, text) if stream else []
            out.append(DecodedChoice(i, ids, lps, finish, reason, text, deltas))
        return out


class CompletionParser:
    """Each completion's content, reasoning and tool calls, in the model type's chat format.

    Reasoning is split off for templates that think (``<think>`` in the chat template); a prompt
    whose text ends with ``<think>`` (Qwen3-VL-Thinking's generation prompt opens it) starts the
    completion inside the reasoning.
    """

    def __init__(self, decoder: CompletionDecoder, model_type: str) -> None:
        self.decoder, self.model_type = decoder, model_type
        self.format = chat_format(model_type)
        self.thinking = "<think>" in (decoder.tokenizer.chat_template or "")

    def opened(self, prompt_ids: Sequence[int]) -> bool:
        """The prompt ends inside an opened ``<think>`` (16 ids: ``<think>\\n`` is one or two in
        Qwen's vocabulary, a few more in a small BPE)."""
        return self.thinking and self.decoder.text(prompt_ids[-16:]).rstrip().endswith("<think>")

    def tool_call_constraint(
        self,
        tools: list[dict[str, Any]],
        tool_choice: str | dict[str, Any],
        prompt_ids: Sequence[int],
        *,
        parallel: bool | None,
    ) -> dict[str, Any]:
        """The structural tag enforcing ``tool_choice`` "required" or a named function in this
        family's call syntax (after the reasoning, when the prompt opened ``<think>``)."""
        if self.format is None:
            raise ValueError(f"no tool-call format is known for model type {self.model_type!r}")
        return self.format.tool_call_constraint(
            tools, tool_choice, parallel=parallel is not False, opened_think=self.opened(prompt_ids)
        )

    def parse(
        self, choices: list[DecodedChoice], prompt_ids: Sequence[int], *, tools: bool, parallel: bool | None
    ) -> list[ParsedCompletion]:
        if self.format is None or not (tools or self.thinking):
            return [ParsedCompletion(c.text) for c in choices]
        opened = self.opened(prompt_ids)
        parsed = [
            self.format.parse(c.text, thinking=self.thinking, opened=opened, tools=tools) for c in choices
        ]
        if parallel is False:  # parallel_tool_calls=false: the first call only
            parsed = [
                ParsedCompletion(p.content, p.reasoning_content, p.tool_calls[:1], p.parse_error)
                for p in parsed
            ]
        return parsed
