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
from typing import Any

from .base import ChatFormat, ToolCall, arguments_schema
from .registry import register

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

    def parse_call(self, body: str) -> ToolCall:
        function = _FUNCTION.match(body)
        if function is None:
            raise ValueError("no <function=name>...</function>")
        args = {name: _value(value) for name, value in _PARAMETER.findall(function.group(2))}
        return ToolCall(function.group(1), json.dumps(args, ensure_ascii=False))

    def call_tag(self, function: dict[str, Any]) -> dict[str, Any]:
        # xgrammar's qwen_xml style is this template's '<parameter=k>\nvalue\n</parameter>\n' list
        return {
            "type": "tag",
            "begin": f"<tool_call>\n<function={function['name']}>\n",
            "content": {
                "type": "json_schema",
                "json_schema": arguments_schema(function),
                "style": "qwen_xml",
            },
            "end": "\n</function>\n</tool_call>",
        }
