"""OpenAI's sampling parameters -> the service's :class:`SamplingOptions`.

``tool_choice`` "required" or a named function arrives as ``structural_tag`` (the chat format's
constraint, :meth:`.decoding.CompletionParser.tool_call_constraint`) and is enforced by vLLM.
``stop`` strings that are one special token (``<|im_end|>``) become stop token ids, the others
are applied to the decoded text after sampling (:mod:`.decoding`). ``max_tokens`` defaults to
what the context leaves; a request that leaves no room is refused before the engine sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmstore_client.inference import SamplingOptions
from pydantic import ValidationError

from .errors import invalid, validation_error
from .schemas import ChatCompletionRequest


@dataclass(frozen=True)
class Sampling:
    options: SamplingOptions
    text_stops: list[str]  # applied to the decoded text
    stop_ids: set[int]  # the stop token ids, to report which one ended a choice


def sampling_for(
    body: ChatCompletionRequest,
    prompt_tokens: int,
    special: dict[str, int],
    max_model_len: int,
    structural_tag: dict[str, Any] | None = None,
) -> Sampling:
    text_stops = [s for s in body.stops if s not in special]
    stop_ids = [*(body.stop_token_ids or []), *(special[s] for s in body.stops if s in special)]
    max_tokens = body.max_completion_tokens or body.max_tokens or max_model_len - prompt_tokens
    if prompt_tokens + max(max_tokens, 1) > max_model_len:
        message = (
            f"the context is {max_model_len} tokens: {prompt_tokens} in the prompt "
            f"leave no room for {max_tokens}"
        )
        raise invalid(message, "max_tokens", "context_length_exceeded")
    try:
        options = SamplingOptions(
            n=body.n,
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),
            seed=body.seed,
            stop_token_ids=stop_ids,
            logprobs=body.logprobs,
            allow_image_tokens=body.mmstore.allow_image_tokens,
            structural_tag=structural_tag,
        )
    except ValidationError as exc:
        raise validation_error(exc) from None
    return Sampling(options, text_stops, set(stop_ids))
