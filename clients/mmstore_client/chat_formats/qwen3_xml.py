"""Qwen3.5's XML tool calls (the Qwen3-Coder format)::

    <tool_call>
    <function=click>
    <parameter=x>
    10
    </parameter>
    </function>
    </tool_call>

A parameter's value is JSON when it parses as JSON (numbers, objects, booleans), else the text.
"""

from __future__ import annotations

import json
import re

from .base import ChatFormat, ToolCall
from .registry import register

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_FUNCTION = re.compile(r"^\s*<function=([^>\s]+)>(.*)</function>\s*$", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@register("qwen3_5", "qwen3_5_moe")
class Qwen3XmlFormat(ChatFormat):
    name = "qwen3_xml"

    def tool_calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = []
        for k, body in enumerate(_CALL.findall(text)):
            function = _FUNCTION.match(body)
            if function is None:
                raise ValueError(f"call {k} has no <function=name>...</function>")
            args = {name: _value(value) for name, value in _PARAMETER.findall(function.group(2))}
            calls.append(ToolCall(function.group(1), json.dumps(args, ensure_ascii=False)))
        if text.count("<tool_call>") != len(calls):
            raise ValueError("a <tool_call> is not closed by </tool_call> (cut by max_tokens?)")
        content = text[:start].rstrip("\n")
        return content or None, calls
