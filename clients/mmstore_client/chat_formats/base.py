"""What a completion's text says, in OpenAI's terms: content, reasoning and tool calls.

A chat format knows how one family's chat template writes tool calls; reasoning (``<think>`` ...
``</think>``) is split off first, by :func:`split_reasoning`, for every template that thinks.
Parsing never raises: text that looks like a tool call but does not parse stays in ``content``,
with ``parse_error`` saying why, so a client sees what the model wrote instead of a 500.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN = "<tool_call>"
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call as OpenAI returns it: ``arguments`` is a JSON object's text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ParsedCompletion:
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    parse_error: str | None = None  # why text that looked like a tool call was left in content


def split_reasoning(text: str, *, opened: bool) -> tuple[str | None, str]:
    """``(reasoning, rest)`` of a thinking model's completion.

    ``opened``: the generation prompt already wrote ``<think>`` (Qwen3-VL-Thinking's does), so the
    completion starts inside the reasoning; a completion that ends before ``</think>`` (cut by
    ``max_tokens``) is all reasoning. Otherwise reasoning is a leading ``<think>`` ... ``</think>``.
    """
    body = text
    if not opened:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return None, text
        body = stripped[len(THINK_OPEN) :]
    reasoning, closed, rest = body.partition(THINK_CLOSE)
    return reasoning.strip("\n"), rest.lstrip("\n") if closed else ""


def arguments_text(arguments: Any) -> str:
    """A call's arguments as OpenAI sends them: a JSON object's text (a string is checked)."""
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError(f"arguments must be a JSON object, not {type(arguments).__name__}")
    return json.dumps(arguments, ensure_ascii=False)


class ChatFormat:
    """How one family's template writes tool calls: each in a ``<tool_call>`` ... ``</tool_call>``
    envelope after the content; subclasses implement :meth:`parse_call` for what is inside."""

    name: ClassVar[str]

    def parse_call(self, body: str) -> ToolCall:
        """One call from the text inside its envelope; raises ``ValueError`` when it does not parse."""
        raise NotImplementedError

    def tool_calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """``(content, calls)`` of ``text`` (after reasoning); raises ``ValueError`` when text that
        opens a tool call does not parse."""
        start = text.find(CALL_OPEN)
        if start < 0:
            return text, []
        calls = []
        for k, body in enumerate(_CALL.findall(text)):
            try:
                calls.append(self.parse_call(body))
            except ValueError as exc:
                raise ValueError(f"call {k}: {exc}") from None
        if text.count(CALL_OPEN) != len(calls):
            raise ValueError("a <tool_call> is not closed by </tool_call> (cut by max_tokens?)")
        content = text[:start].rstrip("\n")
        return content or None, calls

    def parse(self, text: str, *, thinking: bool, opened: bool, tools: bool) -> ParsedCompletion:
        """``text`` as content, reasoning (when the template thinks) and tool calls (when the
        request offered tools and allowed them)."""
        reasoning, rest = split_reasoning(text, opened=opened) if thinking else (None, text)
        if not tools:
            return ParsedCompletion(rest, reasoning)
        try:
            content, calls = self.tool_calls(rest)
        except ValueError as exc:
            return ParsedCompletion(rest, reasoning, [], f"{self.name} tool call not parsed: {exc}")
        return ParsedCompletion(content, reasoning, calls)
