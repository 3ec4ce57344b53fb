"""Completions parsed into content, reasoning and tool calls, per family (constructed completions:
a random tiny model cannot be steered to write them)."""

from __future__ import annotations

import json

import pytest
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


# -- tool_choice "required" / a named function: the constraint, checked with xgrammar itself ----------

ACT_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "click",
            "parameters": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": 0, "maximum": 999},
                    "y": {"type": "integer", "minimum": 0, "maximum": 999},
                },
                "required": ["x", "y"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "scroll",
            "parameters": {
                "type": "object",
                "properties": {"direction": {"enum": ["up", "down"]}},
                "required": ["direction"],
            },
        },
    },
    {"type": "function", "function": {"name": "screenshot"}},  # no parameters: any object
]
CLICK = {"type": "function", "function": {"name": "click"}}


def accepts(constraint: dict, text: str) -> bool:
    """Whether ``text`` is a completion the constraint allows, as the inference engine compiles it
    (JSON contents with tojson's separators) and xgrammar matches it."""
    import xgrammar
    from mmstore_inference.engine import tojson_contents
    from xgrammar.testing import _is_grammar_accept_string

    grammar = xgrammar.Grammar.from_structural_tag(json.dumps(tojson_contents(constraint)))
    return _is_grammar_accept_string(grammar, text)


def hermes_call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def test_named_tool_choice_allows_exactly_one_call_of_that_function_in_hermes_syntax():
    named = HERMES.tool_call_constraint(ACT_TOOLS, CLICK)
    assert accepts(named, hermes_call("click", '{"x": 10, "y": 20}'))
    for refused in (
        hermes_call("scroll", '{"direction": "up"}'),  # another function
        hermes_call("click", '{"x": 10}'),  # a required argument missing
        hermes_call("click", '{"x": "10", "y": 20}'),  # not an integer
        hermes_call("click", '{"x": 1000, "y": 20}'),  # above the schema's maximum
        hermes_call("click", '{"x":10,"y":20}'),  # not how the template's tojson writes it
        hermes_call("click", '{"x": 10, "y": 20}') + "\n" + hermes_call("click", '{"x": 1, "y": 2}'),
        "Sure. " + hermes_call("click", '{"x": 10, "y": 20}'),  # text before the call
        '{"x": 10, "y": 20}',  # vLLM's bare-JSON style
    ):
        assert not accepts(named, refused), refused


def test_required_tool_choice_allows_calls_of_any_tool_one_when_not_parallel():
    click, scroll = hermes_call("click", '{"x": 1, "y": 2}'), hermes_call("scroll", '{"direction": "down"}')
    shot = hermes_call("screenshot", '{"any": [1, {"a": null}]}')
    required = HERMES.tool_call_constraint(ACT_TOOLS, "required")
    assert all(accepts(required, t) for t in (click, scroll, shot, f"{click}\n{scroll}\n{shot}"))
    assert not accepts(required, "") and not accepts(required, "No call.")
    assert not accepts(required, f"{click}{scroll}")  # the template puts a newline between calls
    single = HERMES.tool_call_constraint(ACT_TOOLS, "required", parallel=False)
    assert accepts(single, scroll) and not accepts(single, f"{click}\n{scroll}")


def test_constraint_refuses_a_choice_it_cannot_enforce():
    with pytest.raises(ValueError, match="'type_text', which tools does not define"):
        HERMES.tool_call_constraint(ACT_TOOLS, {"type": "function", "function": {"name": "type_text"}})
    with pytest.raises(ValueError, match="at least one function"):
        HERMES.tool_call_constraint([], "required")
    with pytest.raises(ValueError, match="auto and none sample freely"):
        HERMES.tool_call_constraint(ACT_TOOLS, "auto")


def test_qwen3_5_xml_constraint_allows_its_own_call_syntax():
    call = (
        "<tool_call>\n<function=click>\n<parameter=x>\n10\n</parameter>\n"
        "<parameter=y>\n20\n</parameter>\n</function>\n</tool_call>"
    )
    assert accepts(XML.tool_call_constraint(ACT_TOOLS, CLICK), call)
    assert XML.parse(call, thinking=False, opened=False, tools=True).tool_calls[0].name == "click"
    assert not accepts(XML.tool_call_constraint(ACT_TOOLS, CLICK), hermes_call("click", '{"x": 10, "y": 20}'))
    required = XML.tool_call_constraint(ACT_TOOLS, "required")
    scroll = (
        "<tool_call>\n<function=scroll>\n<parameter=direction>\nup\n</parameter>\n</function>\n</tool_call>"
    )
    assert accepts(required, scroll) and accepts(required, f"{call}\n{scroll}")


@pytest.mark.parametrize("template", ["qwen3_vl_instruct", "qwen3_vl_thinking"])
def test_constraint_accepts_the_completion_the_real_template_renders(template):
    """The HF tokenizer renders an assistant turn with reasoning (where the template thinks) and two
    tool calls; the completion text it implies (after the generation prompt, before <|im_end|>) is
    one the "required" constraint allows, and the named one allows the single-call version."""
    from conftest import tiny_with_template
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_with_template("qwen3_vl", template))
    opened = template.endswith("thinking")
    user = [{"role": "user", "content": "Click the red shape."}]
    calls = [
        {"type": "function", "function": {"name": "click", "arguments": {"x": 12, "y": 340}}},
        {"type": "function", "function": {"name": "scroll", "arguments": {"direction": "up"}}},
    ]

    def completion(tool_calls: list[dict]) -> str:
        answer = {"role": "assistant", "content": "", "tool_calls": tool_calls}
        if opened:
            answer["reasoning_content"] = "the red one is left"
        prompt = tok.apply_chat_template(user, tools=ACT_TOOLS, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template([*user, answer], tools=ACT_TOOLS, tokenize=False)
        assert full.startswith(prompt) and prompt.rstrip().endswith("<think>") == opened
        return full[len(prompt) :].removesuffix("\n").removesuffix("<|im_end|>")

    both, one = completion(calls), completion(calls[:1])
    assert accepts(HERMES.tool_call_constraint(ACT_TOOLS, "required", opened_think=opened), both)
    assert accepts(HERMES.tool_call_constraint(ACT_TOOLS, CLICK, opened_think=opened), one)
    assert not accepts(HERMES.tool_call_constraint(ACT_TOOLS, CLICK, opened_think=opened), both)
