"""Hermes-style tool calls, as the Qwen2.5-VL and Qwen3-VL templates ask for them::

    <tool_call>
    {"name": "click", "arguments": {"x": 10, "y": 20}}
    </tool_call>

Content is the text before the first ``<tool_call>``, as vLLM's ``hermes`` parser returns it.
"""

from __future__ import annotations

import json
import re

from .base import ChatFormat, ToolCall, arguments_text
from .registry import register

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@register("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
class HermesFormat(ChatFormat):
    name = "hermes"

    def tool_calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = []
        for k, body in enumerate(_CALL.findall(text)):
            try:
                call = json.loads(body)
            except json.JSONDecodeError as exc:
                raise ValueError(f"call {k} is not JSON ({exc})") from None
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ValueError(f"call {k} has no string 'name'")
            try:
                calls.append(ToolCall(call["name"], arguments_text(call.get("arguments", {}))))
            except ValueError as exc:
                raise ValueError(f"call {k}: {exc}") from None
        if text.count("<tool_call>") != len(calls):
            raise ValueError("a <tool_call> is not closed by </tool_call> (cut by max_tokens?)")
        content = text[:start].rstrip("\n")
        return content or None, calls
