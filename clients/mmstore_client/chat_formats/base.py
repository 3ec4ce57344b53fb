"""What a completion's text says, in OpenAI's terms: content, reasoning and tool calls.

A chat format knows how one family's chat template writes tool calls; reasoning (``<think>`` ...
``</think>``) is split off first, by :func:`split_reasoning`, for every template that thinks.
Parsing never raises: text that looks like a tool call but does not parse stays in ``content``,
with ``parse_error`` saying why, so a client sees what the model wrote instead of a 500.

The same format writes the constraint that ENFORCES ``tool_choice`` "required" or a named function
(:meth:`ChatFormat.tool_call_constraint`): an xgrammar structural tag (plain JSON: vLLM's
``StructuredOutputsParams(structural_tag=...)`` takes it) that lets the model write only its own
call syntax, the one its template renders back, so the sampled ids stay what the trainer and the
next turn's bridge see. vLLM's own ``required`` writes bare JSON instead, which no Qwen template
renders.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN = "<tool_call>"
# after an opened <think>: the reasoning, then what the thinking templates write before the content
# ('<think>\n' + reasoning + '\n</think>\n\n')
REASONING_END = "\n</think>\n\n"
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


def arguments_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of a function's arguments: its ``parameters``, or any object."""
    return function.get("parameters") or {"type": "object"}


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


def function_named(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The function definition called ``name`` among OpenAI's ``tools``; ``ValueError`` if none."""
    for tool in tools:
        if tool.get("type") == "function" and tool["function"]["name"] == name:
            return tool["function"]
    offered = ", ".join(t["function"]["name"] for t in tools if t.get("type") == "function")
    raise ValueError(
        f"tool_choice names the function {name!r}, which tools does not define (tools: {offered})"
    )


class ChatFormat:
    """How one family's template writes tool calls: each in a ``<tool_call>`` ... ``</tool_call>``
    envelope after the content; subclasses implement :meth:`parse_call` for what is inside and
    :meth:`call_tag` for the structural tag of one call."""

    name: ClassVar[str]
    call_separator: ClassVar[str] = "\n"  # between two calls, as the templates write them

    def call_tag(self, function: dict[str, Any]) -> dict[str, Any]:
        """xgrammar's ``tag`` format of one call of ``function`` (OpenAI's function definition:
        ``name``, ``parameters``), byte for byte as the template renders the call."""
        raise NotImplementedError

    def tool_call_constraint(
        self,
        tools: list[dict[str, Any]],
        tool_choice: str | dict[str, Any],
        *,
        parallel: bool = True,
        opened_think: bool = False,
    ) -> dict[str, Any]:
        """The structural tag that enforces ``tool_choice`` on a completion.

        ``"required"``: one call or more (exactly one when ``parallel`` is false) of any of
        ``tools``, nothing before them, the template's separator between them; a named function
        (``{"type": "function", "function": {"name": ...}}``): exactly one call of it. Arguments
        are a JSON object valid under the function's ``parameters`` (any object when it has none).
        ``opened_think``: the prompt ends inside ``<think>`` (Qwen3-VL-Thinking's generation
        prompt): free reasoning (no ``<think>``/``</think>`` inside) and ``\n</think>\n\n`` first.
        Raises ``ValueError`` when the choice names no function of ``tools``.
        """
        if tool_choice == "required":
            functions = [t["function"] for t in tools if t.get("type") == "function"]
            if not functions:
                raise ValueError("tool_choice 'required' needs at least one function in tools")
            calls: dict[str, Any] = {
                "type": "tags_with_separator",
                "tags": [self.call_tag(f) for f in functions],
                "separator": self.call_separator,
                "at_least_one": True,
                "stop_after_first": not parallel,
            }
        elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
            calls = self.call_tag(function_named(tools, tool_choice["function"]["name"]))
        else:
            raise ValueError(
                f"tool_choice {tool_choice!r} is not enforced by a constraint (auto and none sample freely)"
            )
        if opened_think:
            reasoning = {"type": "any_text", "excludes": [THINK_OPEN, THINK_CLOSE]}
            think = {"type": "tag", "begin": "", "content": reasoning, "end": REASONING_END}
            calls = {"type": "sequence", "elements": [think, calls]}
        return {"type": "structural_tag", "format": calls}

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
