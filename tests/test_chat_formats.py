"""Completions parsed into content, reasoning and tool calls, per family (constructed completions:
a random tiny model cannot be steered to write them)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from mmstore_client.chat_formats import chat_format, known_model_types, split_reasoning

HERMES = chat_format("qwen3_vl")
XML = chat_format("qwen3_5")


def test_every_qwen_layout_type_has_a_format_and_others_none():
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"} <= set(
        known_model_types()
    )
    assert chat_format("gemma3") is None


def test_hermes_calls_content_and_ids():
    text = (
        "Clicking twice.\n<tool_call>\n"
        '{"name": "click", "arguments": {"x": 10, "y": 20}}\n</tool_call>\n<tool_call>\n'
        '{"name": "type", "arguments": {"text": "héllo"}}\n</tool_call>'
    )
    parsed = HERMES.parse(text, thinking=False, opened=False, tools=True)
    assert parsed.content == "Clicking twice." and parsed.parse_error is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("click", {"x": 10, "y": 20}),
        ("type", {"text": "héllo"}),
    ]
    assert len({c.id for c in parsed.tool_calls}) == 2
    assert all(c.id.startswith("call_") for c in parsed.tool_calls)
    only_call = HERMES.parse(text[text.index("<tool_call>") :], thinking=False, opened=False, tools=True)
    assert only_call.content is None


def test_unparseable_tool_call_is_content_with_a_flag():
    for bad in (
        '<tool_call>\n{"name": "click", "arguments": {"x": 1}\n</tool_call>',  # missing brace
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "click", "arguments": [1]}\n</tool_call>',  # not an object
        'ok <tool_call>\n{"name": "click", "arguments": {}}',  # cut by max_tokens
    ):
        parsed = HERMES.parse(bad, thinking=False, opened=False, tools=True)
        assert parsed.content == bad and parsed.tool_calls == []
        assert parsed.parse_error and parsed.parse_error.startswith("hermes tool call not parsed")


def test_without_tools_text_is_content():
    text = '<tool_call>\n{"name": "click", "arguments": {}}\n</tool_call>'
    assert HERMES.parse(text, thinking=False, opened=False, tools=False).content == text


def test_reasoning_split_with_and_without_an_opened_think():
    assert split_reasoning("plan\n</think>\n\nanswer", opened=True) == ("plan", "answer")
    assert split_reasoning("still thinking", opened=True) == ("still thinking", "")  # cut inside
    assert split_reasoning("<think>\nplan\n</think>\n\nanswer", opened=False) == ("plan", "answer")
    assert split_reasoning("no reasoning", opened=False) == (None, "no reasoning")
    parsed = HERMES.parse(
        'look\n</think>\n\n<tool_call>\n{"name": "click", "arguments": {"x": 1}}\n</tool_call>',
        thinking=True,
        opened=True,
        tools=True,
    )
    assert parsed.reasoning_content == "look" and parsed.content is None
    assert parsed.tool_calls[0].name == "click"


def test_qwen3_5_xml_calls():
    text = (
        "Sure.\n<tool_call>\n<function=click>\n<parameter=x>\n10\n</parameter>\n"
        "<parameter=why>\nthe red one\n</parameter>\n</function>\n</tool_call>"
    )
    parsed = XML.parse(text, thinking=False, opened=False, tools=True)
    assert parsed.content == "Sure."
    assert json.loads(parsed.tool_calls[0].arguments) == {"x": 10, "why": "the red one"}
    bad = XML.parse("<tool_call>\nclick(1, 2)\n</tool_call>", thinking=False, opened=False, tools=True)
    assert bad.tool_calls == [] and bad.parse_error


PIECES = [
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    '{"name": "a", "arguments": {}}',
    "<function=f>",
]
PIECES += ["</function>", "<parameter=p>", "</parameter>", "\n", "{", '"', "1"]


@given(text=st.lists(st.sampled_from(PIECES) | st.text(max_size=5), max_size=40).map("".join))
def test_parsing_never_raises(text):
    for fmt in (HERMES, XML):
        for thinking in (False, True):
            parsed = fmt.parse(text, thinking=thinking, opened=thinking, tools=True)
            for c in parsed.tool_calls:
                assert isinstance(json.loads(c.arguments), dict)


def test_streamed_events_of_a_parsed_completion_end_with_its_calls():
    """Streaming: token chunks keep ids with empty text; reasoning, content and the tool calls
    (with their index) come whole in the last chunk, finish_reason tool_calls."""
    import asyncio

    from mmstore_inference.openai import sse
    from mmstore_inference.openai.decoding import DecodedChoice
    from mmstore_inference.openai.schemas import MmstoreInfo, RenderInfo

    text = 'look\n</think>\n\n<tool_call>\n{"name": "click", "arguments": {"x": 1, "y": 2}}\n</tool_call>'
    parsed = HERMES.parse(text, thinking=True, opened=True, tools=True)
    choice = DecodedChoice(0, [5, 6, 7], None, "stop", 2, text, deltas=["look", "\n</think>\n\n", text[18:]])
    info = MmstoreInfo(
        family="qwen3_vl",
        fingerprint="f",
        descriptors=[],
        image_spans=[],
        render=RenderInfo(mode="render", previous_tokens=None, extends_previous=None),
        run=None,
        offloaded=[],
        timings={},
    )

    async def events() -> list[dict]:
        out = []
        async for e in sse.chunks({"id": "x"}, [choice], [parsed], [None], None, [1, 2], info):
            if e.strip() != "data: [DONE]":
                out.append(json.loads(e.removeprefix("data: ")))
        return out

    chunks = asyncio.run(events())
    token_chunks = [c for c in chunks[1:] if c["choices"][0]["token_ids"]]
    assert [c["choices"][0]["token_ids"] for c in token_chunks] == [[5], [6], [7]]
    assert all(c["choices"][0]["delta"] == {"content": ""} for c in token_chunks)
    (last,) = chunks[-1]["choices"]
    assert last["finish_reason"] == "tool_calls"
    assert last["delta"]["reasoning_content"] == "look" and last["delta"]["content"] is None
    (tool_call,) = last["delta"]["tool_calls"]
    assert tool_call["index"] == 0 and tool_call["function"] == {
        "name": "click",
        "arguments": '{"x": 1, "y": 2}',
    }
