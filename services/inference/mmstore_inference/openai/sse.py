"""Server-sent events of a chat completion (``stream=true``).

The engine call is the checked generate path, which returns finished completions, so the events
are written once the choices are decoded: per choice a role chunk, one chunk per token (its text
delta, id and logprob), the last with the finish reason; then usage when asked for, then
``[DONE]``. The first chunk also carries ``prompt_token_ids`` and ``mmstore``, as vLLM sends the
ids. An error is an ordinary error response, never a broken stream.

A completion parsed into reasoning or tool calls keeps one chunk per token (ids, logprobs) with an
empty text delta; its ``reasoning_content``, ``content`` and ``tool_calls`` come whole in the last
chunk, with the finish reason (the completion is parsed once it is finished).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from mmstore_client.chat_formats import ParsedCompletion

from .decoding import DecodedChoice
from .schemas import ChoiceLogprobs, MmstoreInfo, Usage


def finish_reason(choice: DecodedChoice, parsed: ParsedCompletion) -> str:
    """OpenAI's: ``tool_calls`` when a completion that stopped by itself called tools."""
    return "tool_calls" if parsed.tool_calls and choice.finish == "stop" else choice.finish


def _is_plain(choice: DecodedChoice, parsed: ParsedCompletion) -> bool:
    return parsed.reasoning_content is None and not parsed.tool_calls and parsed.content == choice.text


async def chunks(
    head: dict,
    choices: list[DecodedChoice],
    parsed: list[ParsedCompletion],
    logprobs: list[ChoiceLogprobs | None],
    usage: Usage | None,
    prompt_token_ids: list[int],
    mmstore: MmstoreInfo,
) -> AsyncIterator[str]:
    def chunk(choices_: list[dict], **extra: Any) -> str:
        data = head | {"object": "chat.completion.chunk", "choices": choices_} | extra
        return f"data: {json.dumps(data)}\n\n"

    for c, p, lp in zip(choices, parsed, logprobs, strict=True):
        plain = _is_plain(c, p)
        opening = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        if c.index == 0:
            extra = {"mmstore": mmstore.model_dump(mode="json"), "prompt_token_ids": prompt_token_ids}
            yield chunk([opening], **extra)
        else:
            yield chunk([opening])
        lps = lp.model_dump()["content"] if lp is not None else None
        last = len(c.ids) - 1 if plain else -1
        for k, (tok, delta) in enumerate(zip(c.ids, c.deltas, strict=True)):
            yield chunk(
                [
                    {
                        "index": c.index,
                        "delta": {"content": delta if plain else ""},
                        "logprobs": {"content": [lps[k]]} if lps is not None else None,
                        "finish_reason": c.finish if k == last else None,
                        "stop_reason": c.stop_reason if k == last else None,
                        "token_ids": [tok],
                    }
                ]
            )
        if not plain:
            delta: dict[str, Any] = {"content": p.content, "reasoning_content": p.reasoning_content}
            if p.tool_calls:
                delta["tool_calls"] = [{"index": i, **t.openai()} for i, t in enumerate(p.tool_calls)]
            closing = {"delta": delta, "finish_reason": finish_reason(c, p), "stop_reason": c.stop_reason}
            extra = {"mmstore": {"tool_call_parse_error": p.parse_error}} if p.parse_error else {}
            yield chunk([{"index": c.index, **closing, "token_ids": [], **extra}])
        elif not c.ids:
            closing = {"delta": {}, "finish_reason": c.finish, "stop_reason": c.stop_reason, "token_ids": []}
            yield chunk([{"index": c.index, **closing}])
    if usage is not None:
        yield chunk([], usage=usage.model_dump())
    yield "data: [DONE]\n\n"
