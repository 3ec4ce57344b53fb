"""Agents through the OpenAI endpoint: tools, tool calls, tool results with images, template
options, and the refusals, with the official ``openai`` client on a real inference service (vLLM
CPU). Its tiny Qwen2-VL carries the real Qwen3-VL-Instruct template (tools, tool responses, system
text only): the token format is Qwen's either way, and the Qwen2-VL architecture loads in vLLM.
Sampling cannot be steered on random weights: tool calls are parsed from constructed completions in
test_chat_formats.py; here every request with tools is served and its prompt is the renderer's."""

from __future__ import annotations

import base64
import json

import jsonschema
import openai
import pytest
from conftest import ready_inference, tiny_with_template
from hypothesis import HealthCheck, given, settings
from mmstore_client import StoreClient
from mmstore_client.render import Renderer
from support import FetchingRenderer, image_bytes
from test_agent_render import TOOL_OUTPUT, TOOLS
from test_chat_formats import ACT_TOOLS, hermes_call

RUN = "agents"


@pytest.fixture(scope="module")
def agent_model():
    return tiny_with_template("qwen2_vl", "qwen3_vl_instruct")


@pytest.fixture(scope="module")
def agent_server(agent_model, store, tmp_path_factory):
    """The one extra vLLM start of this module (the session's tiny Qwen2-VL has no tool template)."""
    with ready_inference(agent_model, store.url, tmp_path_factory.mktemp("agents")) as server:
        yield server


@pytest.fixture(scope="module")
def client(agent_server):
    base = f"{agent_server.url}/v1"
    with openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def renderer(agent_model, store):
    with StoreClient(store.url) as store_client:
        yield FetchingRenderer(Renderer.from_pretrained(agent_model), store_client)


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def screenshot(seed: int) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(image_bytes(64 + 8 * seed, 48, seed=seed))}}


def create(client, model, messages, **kw):
    return client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, **({"max_tokens": 6, "temperature": 0.0} | kw)
    )


def as_refs(messages: list[dict], offloaded: list[str]) -> list[dict]:
    """``messages`` with their data URIs replaced, in order, by the refs the service offloaded."""
    digests = iter(offloaded)
    out = []
    for m in messages:
        if isinstance(m.get("content"), list):
            parts = [
                {"type": "image_url", "image_url": {"url": f"mmstore://blobs/{next(digests)}"}}
                if p.get("type") == "image_url"
                else p
                for p in m["content"]
            ]
            m = {**m, "content": parts}
        out.append(m)
    return out


def template_calls(message: dict) -> dict:
    """The assistant message as the template gets it (arguments parsed, as the endpoint does)."""
    calls = [
        {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
        for c in message.get("tool_calls", [])
    ]
    return {**message, "tool_calls": calls} if calls else message


def test_five_turn_agent_with_tools_served_and_rendered_exactly(client, agent_model, renderer):
    """A screenshot, then per turn: the assistant's tool call and the tool's result (text and a new
    screenshot as a data URI, offloaded like a user image). Each prompt is the client-side
    renderer's render of the same messages with the same tools."""
    model = agent_model.name
    messages: list[dict] = [
        {"role": "system", "content": "You operate a screen."},
        {"role": "user", "content": [{"type": "text", "text": "Click the red shape."}, screenshot(0)]},
    ]
    for turn in range(5):
        resp = create(client, model, messages)
        (choice,) = resp.choices
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length", "tool_calls")
        offloaded = resp.mmstore["offloaded"]  # every data URI of the request, in order
        assert len(resp.mmstore["descriptors"]) == len(offloaded) == turn + 1
        rendered = renderer.render([template_calls(m) for m in as_refs(messages, offloaded)], tools=TOOLS)
        assert resp.prompt_token_ids == rendered.token_ids
        text = renderer.tokenizer.decode(resp.prompt_token_ids)
        assert "<tools>" in text and '"name": "click"' in text
        call_id = f"call_{turn}"
        arguments = f'{{"x": {10 * turn}, "y": 5}}'
        messages += [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "click", "arguments": arguments}}
                ],
            },
            {
                "role": "tool",
                "tool_call_id": call_id,
                "content": [{"type": "text", "text": f"clicked ({10 * turn}, 5)"}, screenshot(turn + 1)],
            },
        ]
    assert '<tool_call>\n{"name": "click", "arguments": {"x": 30, "y": 5}}\n</tool_call>' in text
    assert text.count("<tool_response>") == 4


def test_bridge_after_a_tool_result_keeps_the_sampled_ids(client, agent_model):
    model = agent_model.name
    messages = [{"role": "user", "content": [{"type": "text", "text": "Go."}, screenshot(7)]}]
    first = create(client, model, messages)
    (choice,) = first.choices
    previous = [*first.prompt_token_ids, *choice.token_ids]
    sampled = {"role": "assistant", "content": choice.message.content or ""}
    result = {
        "role": "tool",
        "tool_call_id": "call_0",
        "content": [{"type": "text", "text": "ok"}, screenshot(8)],
    }
    second = create(
        client, model, [*messages, sampled, result], extra_body={"mmstore": {"previous_token_ids": previous}}
    )
    assert second.mmstore["render"]["mode"] == "bridge"
    assert second.prompt_token_ids[: len(previous)] == previous


def test_tool_choice_none_auto_and_parallel_calls_are_served(client, agent_model):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Go."}, screenshot(2)]}]
    for options in ({"tool_choice": "none"}, {"tool_choice": "auto"}, {"parallel_tool_calls": False}):
        assert create(client, agent_model.name, messages, **options).choices
    stream = create(client, agent_model.name, messages, stream=True)
    chunks = list(stream)
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")


def forced(client, model, messages, tool_choice, **kw):
    return client.chat.completions.create(
        model=model,
        messages=messages,
        tools=ACT_TOOLS,
        tool_choice=tool_choice,
        **({"max_tokens": 120, "temperature": 1.0, "seed": 11} | kw),
    )


def check_calls(choice, decode, names: set[str]) -> str:
    """The choice called tools (finish_reason tool_calls), each one of ``names`` with arguments valid
    under its schema, and its sampled ids are the model's own <tool_call> syntax of those calls,
    newline-separated, then a stop token (the checkpoint's eos ids: <|im_end|> or <|endoftext|>).
    Returns the sampled text before the stop token."""
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    schemas = {t["function"]["name"]: t["function"].get("parameters") for t in ACT_TOOLS}
    written = []
    for call in choice.message.tool_calls:
        assert call.function.name in names and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name] or {})
        written.append(hermes_call(call.function.name, call.function.arguments))
    *calls, stop = choice.token_ids
    assert decode([stop]) in ("<|im_end|>", "<|endoftext|>")
    text = decode(calls)
    assert text == "\n".join(written)
    return text


def test_named_tool_choice_is_enforced_in_the_models_own_call_syntax(client, agent_model, renderer):
    """tool_choice naming a function: every sample calls it once, arguments valid under its schema,
    written as the template writes calls (not vLLM's bare JSON), and the renderer's render of the
    returned assistant message has the same text as the sampled ids."""
    model = agent_model.name
    messages = [{"role": "user", "content": [{"type": "text", "text": "Click it."}, screenshot(9)]}]
    named = {"type": "function", "function": {"name": "click"}}
    resp = forced(client, model, messages, named, n=3)
    decode = renderer.tokenizer.decode
    for choice in resp.choices:
        text = check_calls(choice, decode, {"click"})
        assert len(choice.message.tool_calls) == 1
        answer = {
            "role": "assistant",
            "content": None,
            "tool_calls": [c.model_dump() for c in choice.message.tool_calls],
        }
        refs = as_refs(messages, resp.mmstore["offloaded"])
        rendered = renderer.render(
            [*refs, template_calls(answer)], tools=ACT_TOOLS, add_generation_prompt=False
        ).token_ids
        assert rendered[: len(resp.prompt_token_ids)] == resp.prompt_token_ids
        assert decode(rendered[len(resp.prompt_token_ids) :]) == text + "<|im_end|>\n"
    streamed = list(forced(client, model, messages, named, stream=True))
    (last,) = streamed[-1].choices
    assert last.finish_reason == "tool_calls" and last.delta.tool_calls[0].function.name == "click"


def test_required_tool_choice_is_enforced_one_call_unless_parallel(client, agent_model, renderer):
    model = agent_model.name
    messages = [{"role": "user", "content": [{"type": "text", "text": "Act."}, screenshot(10)]}]
    decode = renderer.tokenizer.decode
    names = {"click", "scroll", "screenshot"}
    single = forced(client, model, messages, "required", parallel_tool_calls=False, n=4, seed=5)
    for choice in single.choices:
        check_calls(choice, decode, names)
        assert len(choice.message.tool_calls) == 1
    several = forced(client, model, messages, "required", n=4, seed=6, max_tokens=400)
    assert all(check_calls(choice, decode, names) for choice in several.choices)
    # the sampled call bridges into the next turn unchanged
    (choice, *_) = several.choices
    previous = [*several.prompt_token_ids, *choice.token_ids]
    answer = {
        "role": "assistant",
        "content": None,
        "tool_calls": [c.model_dump() for c in choice.message.tool_calls],
    }
    results = [{"role": "tool", "tool_call_id": c.id, "content": "done"} for c in choice.message.tool_calls]
    nxt = forced(
        client,
        model,
        [*messages, answer, *results],
        "required",
        extra_body={"mmstore": {"previous_token_ids": previous}},
    )
    assert nxt.mmstore["render"]["mode"] == "bridge" and nxt.prompt_token_ids[: len(previous)] == previous
    check_calls(nxt.choices[0], decode, names)


def test_a_tool_schema_the_grammar_cannot_compile_is_refused_and_the_engine_keeps_serving(
    client, agent_model
):
    model = agent_model.name
    go = [{"role": "user", "content": "Go."}]
    odd = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"x": {"type": "nonsense"}}},
            },
        }
    ]
    _refused(
        lambda: client.chat.completions.create(model=model, messages=go, tools=odd, tool_choice="required"),
        "engine_rejected",
        says="nonsense",
    )
    assert (
        forced(client, model, go, {"type": "function", "function": {"name": "scroll"}})
        .choices[0]
        .message.tool_calls
    )


def test_chat_template_kwargs_reach_the_template(client, agent_model, renderer):
    messages = [{"role": "user", "content": [screenshot(3), {"type": "text", "text": "What?"}]}]
    resp = create(
        client, agent_model.name, messages, extra_body={"chat_template_kwargs": {"add_vision_id": True}}
    )
    assert "Picture 1: <|vision_start|>" in renderer.tokenizer.decode(resp.prompt_token_ids)
    bad = {"chat_template_kwargs": {"tools": []}}
    with pytest.raises(openai.BadRequestError) as err:
        create(client, agent_model.name, messages, extra_body=bad)
    assert err.value.code == "invalid_template_option"


def _refused(call, code: str, param: str | None = None, says: str | None = None) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        call()
    assert err.value.code == code, err.value.body
    if param is not None:
        assert err.value.param == param
    if says is not None:
        assert says in err.value.message


def test_refusals_name_the_message_and_part(client, agent_model):
    model = agent_model.name
    go = [{"role": "user", "content": [{"type": "text", "text": "Go."}, screenshot(4)]}]
    unknown = {"type": "function", "function": {"name": "type_text"}}
    _refused(
        lambda: create(client, model, go, tool_choice=unknown),
        "invalid_request",
        "tool_choice",
        says="'type_text', which tools does not define (tools: click, screenshot)",
    )
    _refused(
        lambda: client.chat.completions.create(model=model, messages=go, tool_choice="required"),
        "invalid_request",
        "tool_choice",
    )
    video = {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}
    clip = [{"role": "user", "content": [{"type": "text", "text": "Watch."}, video]}]
    _refused(lambda: create(client, model, clip), "video_unsupported", says="messages[0].content[1]")
    system_image = [{"role": "system", "content": [{"type": "text", "text": "See:"}, screenshot(5)]}, *go]
    _refused(lambda: create(client, model, system_image), "image_not_rendered", says="messages[0] (system)")
    bad_call = {"id": "c", "type": "function", "function": {"name": "click", "arguments": "{x: 1"}}
    bad = [*go, {"role": "assistant", "content": None, "tool_calls": [bad_call]}]
    _refused(
        lambda: create(client, model, [*bad, {"role": "tool", "tool_call_id": "c", "content": "x"}]),
        "invalid_request",
        "messages[1].tool_calls[0].function.arguments",
    )
    assert create(client, model, go).choices  # still serving


def test_endpoint_parser_splits_reasoning_after_an_opened_think_and_parses_calls(tiny_qwen3_vl_thinking):
    """The endpoint's parser on the Qwen3-VL-Thinking template: its generation prompt opens
    <think>, so a completion is reasoning up to </think>, then content and tool calls (constructed
    completions: a random model cannot be steered to write them)."""
    from mmstore_inference.openai.decoding import CompletionDecoder, CompletionParser, DecodedChoice

    renderer = Renderer.from_pretrained(tiny_qwen3_vl_thinking)
    parser = CompletionParser(CompletionDecoder(renderer.tokenizer), "qwen3_vl")
    prompt = renderer.render([{"role": "user", "content": "Go."}], {}, tools=TOOLS).token_ids
    assert parser.thinking and parser.opened(prompt)
    texts = [
        'red is left\n</think>\n\n<tool_call>\n{"name": "click", "arguments": {"x": 3, "y": 4}}\n</tool_call>'
        '\n<tool_call>\n{"name": "screenshot", "arguments": {}}\n</tool_call>',
        "thinking and cut by max_tokens",
        'hm\n</think>\n\n<tool_call>\n{"name": "click", "arguments": {"x": 3\n</tool_call>',
    ]
    choices = [DecodedChoice(i, [], None, "stop", None, t) for i, t in enumerate(texts)]
    calls, cut, broken = parser.parse(choices, prompt, tools=True, parallel=None)
    assert calls.reasoning_content == "red is left" and calls.content is None
    assert [(c.name, c.arguments) for c in calls.tool_calls] == [
        ("click", '{"x": 3, "y": 4}'),
        ("screenshot", "{}"),
    ]
    assert (cut.reasoning_content, cut.content, cut.tool_calls) == ("thinking and cut by max_tokens", "", [])
    assert broken.reasoning_content == "hm" and broken.tool_calls == [] and broken.parse_error
    assert broken.content.startswith("<tool_call>")
    (first_only, *_) = parser.parse(choices, prompt, tools=True, parallel=False)
    assert [c.name for c in first_only.tool_calls] == ["click"]
    (no_tools, *_) = parser.parse(choices, prompt, tools=False, parallel=None)
    assert no_tools.reasoning_content == "red is left" and no_tools.content.startswith("<tool_call>")
    instruct = CompletionParser(
        CompletionDecoder(Renderer.from_pretrained(tiny_qwen3_vl_thinking).tokenizer), "gemma3"
    )
    assert (
        instruct.format is None
        and instruct.parse(choices, prompt, tools=True, parallel=None)[0].content == texts[0]
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(output=TOOL_OUTPUT)
def test_long_tool_outputs_of_every_shape_are_never_processed_payloads(client, agent_model, output):
    """Tool outputs of every shape (listings, hex, numbers, JSON) as a tool message's text and as the
    call's arguments are rendered, never refused as a processed payload. The tiny model's context
    is 4096 tokens, which the longest outputs exceed: that refusal (``context_length_exceeded``,
    checked after the render) is the only one allowed."""
    tool_call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "type", "arguments": json.dumps({"text": output})},
    }
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Type it."}, screenshot(6)]},
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": "c1", "content": output},
    ]
    try:
        assert create(client, agent_model.name, messages, max_tokens=1).choices
    except openai.BadRequestError as err:
        assert err.code == "context_length_exceeded", err.message
