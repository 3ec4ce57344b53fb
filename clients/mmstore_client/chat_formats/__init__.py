"""Completions -> OpenAI's message: content, ``reasoning_content`` and ``tool_calls``, per family.

One parser file per tool-call format (:mod:`.hermes`: Qwen2.5-VL, Qwen3-VL; :mod:`.qwen3_xml`:
Qwen3.5), registered by HF model type in :mod:`.registry`, beside the image layouts.
"""

from . import hermes, qwen3_xml  # noqa: F401  (each registers its model types)
from .base import (
    ChatFormat,
    ParsedCompletion,
    ToolCall,
    arguments_text,
    function_named,
    split_reasoning,
)
from .registry import chat_format, known_model_types

__all__ = [
    "ChatFormat",
    "ParsedCompletion",
    "ToolCall",
    "arguments_text",
    "chat_format",
    "function_named",
    "known_model_types",
    "split_reasoning",
]
