"""The wire format of the OpenAI-compatible endpoints.

The request models (strict: unknown fields refused, parameters the service would not honour
refused by name) and the response models the non-streaming response is built from.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from mmstore_client.chat_formats import function_named
from mmstore_client.descriptor import Descriptor, ImageSpan
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..settings import RUN_PATTERN
from .errors import invalid, unsupported

# -- request schemas -----------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str = Field(description="mmstore://blobs/<digest>, a data:image/...;base64 URI or an http(s) URL")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="ignored: the layout decides")


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(BaseModel):
    """Accepted by the schema so that the renderer refuses it by name (``video_unsupported``)
    instead of a schema error that would not say videos are the reason."""

    model_config = ConfigDict(extra="allow")
    type: Literal["video_url", "video", "input_video"]


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class FunctionCall(_Model):
    name: str
    arguments: str = Field(description="a JSON object's text, as the model wrote it (OpenAI's shape)")

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments must be a JSON object's text: {exc}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"arguments must be a JSON object, not {type(parsed).__name__}")
        return value


class ToolCallIn(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall

    def template_call(self) -> dict[str, Any]:
        """As vLLM's chat_utils gives it to templates: ``arguments`` parsed into an object (Qwen's
        templates write a string as it is, an object with ``tojson``)."""
        function = {"name": self.function.name, "arguments": json.loads(self.function.arguments)}
        return {"id": self.id, "type": "function", "function": function}


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    reasoning_content: str | None = Field(
        None, description="an assistant's reasoning, for templates that think"
    )
    reasoning: str | None = Field(None, description="vLLM's newer name for reasoning_content")
    # what clients copy back from a response's message: accepted, not rendered
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any = None
    function_call: Any = None

    def template_message(self) -> dict[str, Any]:
        """The message as the renderer (and the chat template) gets it."""
        out: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if isinstance(self.content, list):
            out["content"] = [
                {"type": "image_url", "image_url": {"url": p.image_url.url}}
                if isinstance(p, ImagePart)
                else p.model_dump(exclude_none=True)
                for p in self.content
            ]
        if self.tool_calls:
            out["tool_calls"] = [c.template_call() for c in self.tool_calls]
        if (reasoning := self.reasoning_content or self.reasoning) is not None:
            out["reasoning_content"] = reasoning
        return out | {k: getattr(self, k) for k in ("name", "tool_call_id") if getattr(self, k)}


class FunctionDefinition(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class MmstoreOptions(_Model):
    run: str | None = Field(None, pattern=RUN_PATTERN, description="store run of offloaded images")
    previous_token_ids: list[int] | None = Field(
        None,
        min_length=1,
        description="the previous turn as sampled: prompt_token_ids + a choice's token_ids",
    )
    previous_messages_count: int | None = Field(
        None, ge=1, description="messages[:k] are what previous_token_ids cover (default: through the "
        "last assistant message)"
    )  # fmt: skip
    bridge: bool = Field(True, description="false: render from scratch, only report extends_previous")
    allow_image_tokens: bool = False


class ChatCompletionRequest(_Model):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(1, ge=1, le=64)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="wins over max_tokens")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="only the sampled token is listed")
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(None, ge=-1, description="vLLM's extra parameter; 0 or -1: off")
    stop_token_ids: list[int] | None = Field(None, description="vLLM's extra parameter")
    return_token_ids: bool | None = Field(None, description="vLLM's; accepted, ids are always returned")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="vLLM's: extra variables for the chat template (e.g. enable_thinking)"
    )
    mmstore: MmstoreOptions = Field(default_factory=MmstoreOptions)
    # accepted and ignored
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    tools: list[Tool] | None = Field(
        None, description="rendered by the chat template; calls parsed per family"
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description="'required' and a named function are enforced in the model's own call syntax "
        "(a structural tag from mmstore_client.chat_formats)",
    )
    parallel_tool_calls: bool | None = Field(
        None, description="false: one call at most (enforced with 'required', else the first parsed call)"
    )
    # accepted only when neutral
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        # a ChatError passes through pydantic untouched (only ValueError becomes a validation error)
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise unsupported(name, "penalties are not applied by this service; send 0 or omit it")
        if self.logit_bias:
            raise unsupported("logit_bias", "not supported (the service bans image markup tokens itself)")
        if self.response_format and self.response_format.get("type") != "text":
            raise unsupported("response_format", "only {'type': 'text'} is supported")
        if self.forces_tool_calls:
            if not self.tools:
                raise invalid("tool_choice 'required' or a named function needs tools", "tool_choice")
            if isinstance(self.tool_choice, NamedToolChoice):
                try:
                    function_named(self.template_tools or [], self.tool_choice.function.name)
                except ValueError as exc:
                    raise invalid(str(exc), "tool_choice") from None
        if self.modalities and self.modalities != ["text"]:
            raise unsupported("modalities", "only ['text'] output is supported")
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs requires logprobs=true", "top_logprobs")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options can only be given with stream=true", "stream_options")
        return self

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template gets them (what ``apply_chat_template(tools=)`` takes)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    @property
    def forces_tool_calls(self) -> bool:
        """``tool_choice`` "required" or a named function: enforced by a constraint on sampling."""
        return self.tool_choice not in (None, "none", "auto")

    @property
    def template_tool_choice(self) -> str | dict[str, Any] | None:
        return (
            self.tool_choice.model_dump()
            if isinstance(self.tool_choice, NamedToolChoice)
            else self.tool_choice
        )

    @property
    def parses_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]


# -- response schemas (the non-streaming response is built from them) ---------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="the sampled token only (see the module docs)")


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(None, description="the <think> part, for templates that think")
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


class ChoiceInfo(BaseModel):
    tool_call_parse_error: str | None = Field(
        None, description="why text that opens a tool call was returned as content instead"
    )


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"]
    stop_reason: int | str | None = Field(description="the stop string or stop token id that ended it")
    token_ids: list[int] = Field(description="the sampled ids, through a stop string's last token")
    mmstore: ChoiceInfo | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class RenderInfo(BaseModel):
    mode: Literal["render", "bridge"]
    previous_tokens: int | None = Field(description="length of previous_token_ids, when sent")
    extends_previous: bool | None = Field(description="prompt_token_ids start with previous_token_ids")


class MmstoreInfo(BaseModel):
    family: str
    fingerprint: str = Field(description="the loaded model's layout fingerprint")
    descriptors: list[Descriptor]
    image_spans: list[ImageSpan] = Field(description="each image's placeholder run in prompt_token_ids")
    render: RenderInfo
    run: str | None = Field(description="the store run of the offloaded images")
    offloaded: list[str] = Field(description="digests of the inline images this request offloaded")
    timings: dict[str, float]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage
    prompt_token_ids: list[int]
    mmstore: MmstoreInfo
