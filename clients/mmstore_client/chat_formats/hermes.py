"""Hermes-style tool calls, as the Qwen2.5-VL and Qwen3-VL templates ask for them::

    <tool_call>
    {"name": "click", "arguments": {"x": 10, "y": 20}}
    </tool_call>

Content is the text before the first ``<tool_call>``, as vLLM's ``hermes`` parser returns it.
"""

from __future__ import annotations

import json
from typing import Any

from .base import ChatFormat, ToolCall, arguments_schema, arguments_text
from .registry import register


@register("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
class HermesFormat(ChatFormat):
    name = "hermes"

    def parse_call(self, body: str) -> ToolCall:
        try:
            call = json.loads(body)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc})") from None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError("no string 'name'")
        return ToolCall(call["name"], arguments_text(call.get("arguments", {})))

    def call_tag(self, function: dict[str, Any]) -> dict[str, Any]:
        # as the templates write it: arguments by tojson, between the name and '}\n</tool_call>'
        return {
            "type": "tag",
            "begin": f'<tool_call>\n{{"name": "{function["name"]}", "arguments": ',
            "content": {"type": "json_schema", "json_schema": arguments_schema(function), "style": "json"},
            "end": "}\n</tool_call>",
        }
