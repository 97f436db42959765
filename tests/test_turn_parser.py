"""Reasoning/answer split, tool calls and UTF-8 streaming, on crafted token streams."""

import pytest

from apertus_mlx import TextDelta, ToolCall, ToolCallError
from apertus_mlx.turn_parser import TurnParser, parse_tool_calls

from formats import ids, load_test_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_test_tokenizer(tmp_path_factory.mktemp("tok"))


def parse(tokenizer, tokens: list[int], start_channel="answer"):
    parser = TurnParser(tokenizer, start_channel)
    events = [e for t in tokens for e in parser.feed(t)]
    return events + parser.close()


def text_of(events, channel="answer") -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.channel == channel)


@pytest.mark.parametrize(
    "text",
    [
        "Grüezi mitenand, wie gaht's?",
        "Emoji: 🇨🇭 🧀 👩🏽‍💻 and ⛰️ done",
        "日本語のテキストと한국어 그리고 中文。",
        "Combining: e\u0301 a\u0308 n\u0303 — Zalgo: Z\u0351\u0352\u0353",
        "  leading spaces,   inner   spaces and trailing  ",
    ],
)
def test_utf8_streams_byte_exact(tokenizer, text):
    tokens = ids(tokenizer, text)
    assert len(tokens) > 3
    events = parse(tokenizer, tokens)
    deltas = [e.text for e in events]
    assert all("\ufffd" not in d for d in deltas)  # never half a character
    # Leading spaces too: the next turn re-renders this text, and the KV cache holds its tokens.
    assert "".join(deltas) == text


def test_reasoning_then_answer(tokenizer):
    tokens = ids(tokenizer, "<|inner_prefix|>", "Let me think: Bern.", "<|inner_suffix|>", "The capital is Bern.")
    events = parse(tokenizer, tokens)
    assert text_of(events, "reasoning") == "Let me think: Bern."
    assert text_of(events, "answer") == "The capital is Bern."
    assert not any(isinstance(e, (ToolCall, ToolCallError)) for e in events)


def test_reasoning_cut_off_is_still_reasoning(tokenizer):
    events = parse(tokenizer, ids(tokenizer, "<|inner_prefix|>", "Still thinking about"))
    assert text_of(events, "reasoning") == "Still thinking about"
    assert text_of(events, "answer") == ""


def test_tool_calls(tokenizer):
    call = '[{"get_weather": {"city": "Bern", "unit": "celsius"}}, {"now": {}}]'
    events = parse(tokenizer, ids(tokenizer, "Checking.", "<|tools_prefix|>", call, "<|tools_suffix|>"))
    assert text_of(events) == "Checking."
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert calls == [
        ToolCall("get_weather", {"city": "Bern", "unit": "celsius"}, '{"city": "Bern", "unit": "celsius"}'),
        ToolCall("now", {}, "{}"),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_raw_arguments_are_the_exact_text(tokenizer):
    raw = ' [ {"f" :{ "a":1,  "b" : [1, 2.50]} } ,{"g":{}}]\n'
    calls = parse_tool_calls(raw)
    assert [c.raw_arguments for c in calls] == ['{ "a":1,  "b" : [1, 2.50]}', "{}"]
    assert calls[0].arguments == {"a": 1, "b": [1, 2.5]}
    assert parse_tool_calls('{"f": {"x": "}"}}')[0].raw_arguments == '{"x": "}"}'  # a lone object


def test_tool_call_ids_do_not_affect_equality():
    assert ToolCall("f", {}, "{}", id="call_a") == ToolCall("f", {}, "{}", id="call_b")


def test_first_space_of_each_section_is_kept(tokenizer):
    tokens = ids(tokenizer, "<|inner_prefix|>", " Let me think", "<|inner_suffix|>", " The answer")
    # The tokenizer's words carry their leading space, as Apertus's byte-level BPE does.
    assert tokenizer.convert_ids_to_tokens(tokens[1])[0] == "Ġ"
    events = parse(tokenizer, tokens)
    assert text_of(events, "reasoning") == " Let me think"
    assert text_of(events, "answer") == " The answer"
    assert text_of(parse(tokenizer, ids(tokenizer, " Hello world"))) == " Hello world"


def test_parser_can_start_inside_reasoning(tokenizer):
    events = parse(tokenizer, ids(tokenizer, "Still thinking", "<|inner_suffix|>", "Done."), start_channel="reasoning")
    assert text_of(events, "reasoning") == "Still thinking"
    assert text_of(events, "answer") == "Done."


def test_tool_call_inside_reasoning_returns_to_reasoning(tokenizer):
    tokens = ids(tokenizer, "<|inner_prefix|>", "Look it up.", "<|tools_prefix|>", '[{"now": {}}]', "<|tools_suffix|>")
    parser = TurnParser(tokenizer)
    events = [e for t in tokens for e in parser.feed(t)]
    assert text_of(events, "reasoning") == "Look it up." and parser.channel == "reasoning"
    assert [e for e in events if isinstance(e, ToolCall)] == [ToolCall("now", {}, "{}")]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('[{"get_weather": {"city": "Bern"}', "tool calls are not valid JSON"),
        ('[{"a": {}, "b": {}}]', "is not a single {name: arguments} object"),
        ('[{"get_weather": "Bern"}]', "arguments of tool 'get_weather' are not a JSON object"),
        ('"just a string"', "tool calls must be a JSON list"),
        ("[]", "holds no calls"),
        ('[{"f": {}, "f": {}}]', "tool calls must be a JSON list"),
    ],
)
def test_malformed_tool_calls_give_error_events(tokenizer, raw, message):
    events = parse(tokenizer, ids(tokenizer, "<|tools_prefix|>", raw, "<|tools_suffix|>"))
    errors = [e for e in events if isinstance(e, ToolCallError)]
    assert len(errors) == 1 and message in errors[0].message and errors[0].raw == raw
    assert parse_tool_calls(raw) == errors
    # No call comes with the error, so the turn does not end as `tool_calls` (test_assembler checks that).
    assert not any(isinstance(e, ToolCall) for e in events)


def test_truncated_tool_call(tokenizer):
    events = parse(tokenizer, ids(tokenizer, "<|tools_prefix|>", '[{"get_weather": {"ci'))
    assert events == [ToolCallError('[{"get_weather": {"ci', "tool call cut off before <|tools_suffix|>")]


def test_stray_special_tokens_carry_no_text(tokenizer):
    events = parse(tokenizer, ids(tokenizer, "Hello", "<|user_start|>", " world"))
    assert text_of(events) == "Hello world"
