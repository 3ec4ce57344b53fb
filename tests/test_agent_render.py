"""Agent conversations (tools, tool calls, tool results with images, reasoning) through the renderer,
against the HF processor of tiny checkpoints carrying the real Qwen3-VL chat templates
(tests/data/chat_templates, sources in its README)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mmstore_client.render import Renderer, RenderError
from support import FetchingRenderer
from test_render import Images, hf_reference, img

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "click",
            "description": "Click the screen at pixel (x, y).",
            "parameters": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
            },
        },
    },
    {"type": "function", "function": {"name": "screenshot", "parameters": {"type": "object"}}},
]


def call(name: str, **arguments) -> dict:
    """A tool call as the endpoint gives it to templates: arguments parsed into an object."""
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": arguments}}


def agent_conversation(images: Images) -> list[dict]:
    """Screenshot -> click -> new screenshot (a tool result with an image) -> click -> done."""
    return [
        {"role": "system", "content": "You operate a screen with tools."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Click the red shape."}, img(images.add(64, 48, 1))],
        },
        {"role": "assistant", "content": "", "tool_calls": [call("click", x=10, y=20)]},
        {
            "role": "tool",
            "tool_call_id": "call_click",
            "content": [{"type": "text", "text": "clicked; new screen:"}, img(images.add(80, 60, 2))],
        },
        {
            "role": "assistant",
            "content": "Trying again.",
            "tool_calls": [call("click", x=30, y=5), call("screenshot")],
        },
        {"role": "tool", "tool_call_id": "call_click", "content": "missed"},
        {"role": "tool", "tool_call_id": "call_screenshot", "content": [img(images.add(100, 140, 3))]},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "Thanks. Once more?"},
    ]


@pytest.fixture(params=["tiny_qwen3_vl_instruct", "tiny_qwen3_vl_thinking"])
def agent_model(request):
    return request.getfixturevalue(request.param)


def test_tools_tool_calls_and_tool_images_render_as_the_hf_processor(agent_model):
    images = Images()
    messages = agent_conversation(images)
    renderer = FetchingRenderer(Renderer.from_pretrained(agent_model), images)
    out = renderer.render(messages, tools=TOOLS)
    ids, grids = hf_reference(agent_model, messages, images, tools=TOOLS)
    assert out.token_ids == ids
    assert [list(d.grid) for d in out.descriptors] == grids and len(grids) == 3
    text = renderer.tokenizer.decode(out.token_ids)
    assert "<tools>" in text and '"name": "click", "arguments": {"x": 10, "y": 20}' in text
    masked = renderer.tokenizer.decode(
        [t for t, m in zip(out.token_ids, out.assistant_mask, strict=True) if m]
    )
    assert '<tool_call>\n{"name": "screenshot", "arguments": {}}\n</tool_call><|im_end|>' in masked


def test_add_vision_id_reaches_the_template(tiny_qwen3_vl_instruct):
    images = Images()
    messages = agent_conversation(images)[:4]
    renderer = FetchingRenderer(Renderer.from_pretrained(tiny_qwen3_vl_instruct), images)
    out = renderer.render(messages, tools=TOOLS, chat_template_kwargs={"add_vision_id": True})
    ids, _ = hf_reference(tiny_qwen3_vl_instruct, messages, images, tools=TOOLS, add_vision_id=True)
    assert out.token_ids == ids
    assert "Picture 2: <|vision_start|>" in renderer.tokenizer.decode(out.token_ids)


def test_images_in_a_system_message_the_template_drops_are_refused(tiny_qwen3_vl_instruct):
    images = Images()
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Reference:"}, img(images.add(64, 48, 1))]},
        {"role": "user", "content": "Go."},
    ]
    renderer = FetchingRenderer(Renderer.from_pretrained(tiny_qwen3_vl_instruct), images)
    with pytest.raises(RenderError) as err:
        renderer.render(messages, tools=TOOLS)
    assert err.value.code == "image_not_rendered" and "messages[0] (system)" in str(err.value)


def _sampled(renderer, text: str) -> list[int]:
    return [*renderer.tokenizer.encode(text, add_special_tokens=False), renderer.eos_token_id]


def test_thinking_bridge_through_tool_results_keeps_sampled_reasoning_and_equals_hf(tiny_qwen3_vl_thinking):
    """Qwen3-VL-Thinking's prompt opens <think>; the sampled reasoning and tool call stay as sampled,
    and while the agent loop runs on tool results the bridge equals a fresh render (and HF's ids)
    of the messages with ``reasoning_content``."""
    images = Images()
    renderer = FetchingRenderer(Renderer.from_pretrained(tiny_qwen3_vl_thinking), images)
    user = {"role": "user", "content": [{"type": "text", "text": "Click red."}, img(images.add(64, 48, 1))]}
    turn1 = renderer.render([user], tools=TOOLS)
    assert renderer.tokenizer.decode(turn1.token_ids).endswith("<|im_start|>assistant\n<think>\n")
    completion = (
        'red is left\n</think>\n\n<tool_call>\n{"name": "click", "arguments": {"x": 3, "y": 4}}\n</tool_call>'
    )
    sampled = _sampled(renderer, completion)
    assistant = {
        "role": "assistant",
        "content": "",
        "reasoning_content": "red is left",
        "tool_calls": [call("click", x=3, y=4)],
    }
    after = turn1.extend(sampled, assistant=True)
    after.messages.append(assistant)
    result = {"role": "tool", "tool_call_id": "call_click", "content": [img(images.add(80, 60, 2))]}
    turn2 = renderer.bridge(after, [result], tools=TOOLS)
    assert turn2.token_ids[: len(after.token_ids)] == after.token_ids
    fresh = renderer.render([user, assistant, result], tools=TOOLS)
    assert turn2.token_ids == fresh.token_ids
    ids, _ = hf_reference(tiny_qwen3_vl_thinking, [user, assistant, result], images, tools=TOOLS)
    assert fresh.token_ids == ids


def test_instruct_bridge_through_a_sampled_tool_call_equals_fresh_render_and_hf(tiny_qwen3_vl_instruct):
    """The sampled tool call stays as sampled (even tokenized unlike the tokenizer would), the tool's
    result with a new screenshot is appended; sampled as the tokenizer encodes it, the bridge equals
    a fresh render and HF's ids."""
    images = Images()
    renderer = FetchingRenderer(Renderer.from_pretrained(tiny_qwen3_vl_instruct), images)
    user = {"role": "user", "content": [{"type": "text", "text": "Click red."}, img(images.add(64, 48, 1))]}
    turn1 = renderer.render([user], tools=TOOLS)
    completion = '<tool_call>\n{"name": "click", "arguments": {"x": 3, "y": 4}}\n</tool_call>'
    assistant = {"role": "assistant", "content": "", "tool_calls": [call("click", x=3, y=4)]}
    result = {"role": "tool", "tool_call_id": "call_click", "content": [img(images.add(80, 60, 2))]}
    tok = renderer.tokenizer
    oddly = [i for ch in completion for i in tok.encode(ch, add_special_tokens=False)]  # an id per character
    assert oddly != _sampled(renderer, completion)[:-1] and tok.decode(oddly) == completion
    for sampled in (_sampled(renderer, completion), [*oddly, renderer.eos_token_id]):
        after = turn1.extend(sampled, assistant=True)
        after.messages.append(assistant)
        turn2 = renderer.bridge(after, [result], tools=TOOLS)
        assert turn2.token_ids[: len(after.token_ids)] == after.token_ids
        assert len(turn2.descriptors) == 2
    fresh = renderer.render([user, assistant, result], tools=TOOLS)
    assert turn2.token_ids != fresh.token_ids  # the oddly tokenized call was kept as sampled
    first = turn1.extend(_sampled(renderer, completion), assistant=True)
    first.messages.append(assistant)
    assert renderer.bridge(first, [result], tools=TOOLS).token_ids == fresh.token_ids
    ids, _ = hf_reference(tiny_qwen3_vl_instruct, [user, assistant, result], images, tools=TOOLS)
    assert fresh.token_ids == ids


def test_thinking_template_dropping_earlier_reasoning_refuses_the_bridge(tiny_qwen3_vl_thinking):
    """A new user turn makes the Thinking template drop earlier turns' reasoning: a fresh render no
    longer starts with the sampled ids, so the bridge refuses (``bridge_failed``) instead of
    silently mixing the two; the fresh render is what the template gives."""
    images = Images()
    renderer = FetchingRenderer(Renderer.from_pretrained(tiny_qwen3_vl_thinking), images)
    user = {"role": "user", "content": [{"type": "text", "text": "Hi"}, img(images.add(64, 48, 1))]}
    turn1 = renderer.render([user])
    sampled = _sampled(renderer, "let me see\n</think>\n\nHello.")
    assistant = {"role": "assistant", "content": "Hello.", "reasoning_content": "let me see"}
    after = turn1.extend(sampled, assistant=True)
    after.messages.append(assistant)
    with pytest.raises(RenderError) as err:
        renderer.bridge(after, [{"role": "user", "content": "Again?"}])
    assert err.value.code == "bridge_failed"
    fresh = renderer.render([user, assistant, {"role": "user", "content": "Again?"}])
    assert fresh.token_ids[: len(after.token_ids)] != after.token_ids
    assert "let me see" not in renderer.tokenizer.decode(fresh.token_ids)


ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# each shape reaches past 4096 characters, where the processed-payload guard looks at strings
TOOL_OUTPUT = st.one_of(
    st.text(max_size=9000),
    st.lists(
        st.text(alphabet=ALNUM, min_size=1, max_size=12).map("/srv/data/".__add__), min_size=420, max_size=900
    ).map("\n".join),  # a directory listing
    st.binary(min_size=2048, max_size=6000).map(bytes.hex),  # a hex dump
    st.lists(st.integers(0, 10**9), min_size=2100, max_size=3000).map(lambda xs: " ".join(map(str, xs))),
    st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=200, max_size=800).map(json.dumps),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda kids: st.lists(kids, max_size=8) | st.dictionaries(st.text(max_size=8), kids, max_size=8),
        max_leaves=400,
    ).map(json.dumps),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(output=TOOL_OUTPUT)
def test_long_tool_outputs_of_every_shape_render(tiny_qwen3_vl_instruct, output):
    """Tool results (and the arguments of the calls that asked for them) are long texts of every
    shape (listings, hex, numbers, JSON): none may trip the processed-payload guard; the renderer
    gives HF's ids for them."""
    renderer = _RENDERERS.setdefault(tiny_qwen3_vl_instruct, Renderer.from_pretrained(tiny_qwen3_vl_instruct))
    messages = [
        {"role": "user", "content": "List it."},
        {"role": "assistant", "content": "", "tool_calls": [call("type", text=output)]},
        {"role": "tool", "tool_call_id": "call_type", "content": [{"type": "text", "text": output}]},
    ]
    out = renderer.render(messages, {}, tools=TOOLS)
    text = renderer.tokenizer.apply_chat_template(
        messages, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert out.token_ids == renderer.tokenizer.encode(text, add_special_tokens=False)


_RENDERERS: dict = {}


def test_qwen2_5_vl_tool_template_renders_text_turns_as_hf_and_refuses_images():
    """Qwen2.5-VL-Instruct's tokenizer_config.json once carried the Qwen2.5 LLM's tool template
    (tests/data/chat_templates/README.md): tools and tool calls, text contents only. Text turns
    render as the HF processor renders them; image parts, which that template cannot take (it adds
    each content to a string), are a RenderError naming the template, never a raw TypeError."""
    from conftest import tiny_with_template

    model = tiny_with_template("qwen2_vl", "qwen2_5_vl_tokenizer_tools")
    images = Images()
    messages = [
        {"role": "user", "content": "Click the red shape."},
        {"role": "assistant", "content": "", "tool_calls": [call("click", x=10, y=20)]},
        {"role": "tool", "tool_call_id": "call_click", "content": "clicked"},
        {"role": "assistant", "content": "Trying again.", "tool_calls": [call("screenshot")]},
        {"role": "tool", "tool_call_id": "call_screenshot", "content": "a red square at (30, 5)"},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "Thanks."},
    ]
    renderer = FetchingRenderer(Renderer.from_pretrained(model), images)
    out = renderer.render(messages, tools=TOOLS)
    assert out.token_ids == hf_reference(model, messages, images, tools=TOOLS)[0]
    text = renderer.tokenizer.decode(out.token_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    assert '\n<tool_call>\n{"name": "click", "arguments": {"x": 10, "y": 20}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nclicked\n</tool_response><|im_end|>" in text
    screenshot = [{"role": "user", "content": [{"type": "text", "text": "Go."}, img(images.add(64, 48, 1))]}]
    with pytest.raises(RenderError) as err:
        renderer.render(screenshot, tools=TOOLS)
    assert err.value.code == "template_error" and "text-only template" in str(err.value)


def mask_by_definition(renderer, messages, **options) -> list[bool]:
    """The assistant mask from its definition: each assistant message's tokens run from the length
    of the rendering before it (with the generation prompt) to its end token, within the length of
    the rendering through it; each length from its own render, tokenized whole."""
    ids = renderer.render(messages, assistant_mask=False, **options).token_ids
    mask = [False] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(renderer.render(messages[:k], assistant_mask=False, **options).token_ids)
        through = messages[: k + 1]
        end = len(
            renderer.render(through, add_generation_prompt=False, assistant_mask=False, **options).token_ids
        )
        seg = ids[start:end]
        stop = seg.index(renderer.eos_token_id) + 1 if renderer.eos_token_id in seg else len(seg)
        mask[start : start + stop] = [True] * stop
    return mask


def test_assistant_mask_from_one_tokenization_equals_its_definition(agent_model, tiny_qwen2_vl):
    """Reasoning, tool calls, tool results with images, empty contents, images just before and after
    assistant messages: the mask taken from the whole text's one tokenization is the definition's."""
    images = Images()
    messages = agent_conversation(images)
    messages[4] = {**messages[4], "reasoning_content": "The shape moved.\n\n"}
    messages += [
        {"role": "assistant", "content": "\n  spaced  \n"},
        {"role": "user", "content": [img(images.add(30, 30, 4))]},
    ]
    for model, options in ((agent_model, {"tools": TOOLS}), (tiny_qwen2_vl, {})):
        renderer = FetchingRenderer(Renderer.from_pretrained(model), images)
        convo = (
            messages if options else [m for m in messages if m["role"] != "tool" and not m.get("tool_calls")]
        )
        out = renderer.render(convo, **options)
        assert sum(out.assistant_mask) > 0
        assert out.assistant_mask == mask_by_definition(renderer, convo, **options)


def test_tools_a_template_ignores_are_refused_not_dropped(tiny_qwen2_vl, tiny_qwen3_vl_instruct):
    """Qwen2-VL's template (Qwen2.5-VL's processor template too) renders the same text with and
    without tools: the model would never see them, so a render with tools is refused, naming why;
    the same conversation renders without tools, and a template with tool use takes them."""
    images = Images()
    messages = [
        {"role": "user", "content": [img(images.add(32, 32, 7)), {"type": "text", "text": "Click it."}]}
    ]
    plain = FetchingRenderer(Renderer.from_pretrained(tiny_qwen2_vl), images)
    assert plain.renderer.renders_tools is False
    with pytest.raises(RenderError) as err:
        plain.render(messages, tools=TOOLS)
    assert err.value.code == "tools_unsupported" and "does not render them" in str(err.value)
    assert plain.render(messages).token_ids == hf_reference(tiny_qwen2_vl, messages, images)[0]
    with_tools = FetchingRenderer(Renderer.from_pretrained(tiny_qwen3_vl_instruct), images)
    assert with_tools.renderer.renders_tools is True
    out = with_tools.render(messages, tools=TOOLS)
    assert out.token_ids == hf_reference(tiny_qwen3_vl_instruct, messages, images, tools=TOOLS)[0]
