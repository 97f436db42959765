"""Turn assembly on scripted token streams: channels, tool calls, stop strings and end of turn."""

import pytest

from apertus_mlx import TextDelta, ToolCall, ToolCallError
from apertus_mlx.assembler import TurnAssembler

from formats import ids, load_test_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_test_tokenizer(tmp_path_factory.mktemp("tok"))


def assemble(tokenizer, tokens, **kwargs):
    """(events, finish reason, tokens consumed) as the scheduler feeds them, stopping at the turn's end."""
    assembler = TurnAssembler(tokenizer, **kwargs)
    events = []
    for token in tokens:
        events += assembler.feed(token)
        if assembler.finish:
            break
    else:
        events += assembler.close()
    return events, assembler.finish, len(assembler.tokens)


def text_of(events, channel="answer") -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.channel == channel)


def test_reasoning_then_answer_then_tool_call_ends_the_turn(tokenizer):
    script = ids(
        tokenizer,
        "<|inner_prefix|>",
        "Need weather.",
        "<|inner_suffix|>",
        "One moment.",
        "<|tools_prefix|>",
        '[{"get_weather": {"city": "Zürich"}}]',
        "<|tools_suffix|>",
        "never reached",
    )
    events, finish, consumed = assemble(tokenizer, script)
    assert finish == "tool_calls"
    assert consumed == script.index(tokenizer.convert_tokens_to_ids("<|tools_suffix|>")) + 1
    assert text_of(events, "reasoning") == "Need weather." and text_of(events) == "One moment."
    assert [e for e in events if isinstance(e, ToolCall)] == [
        ToolCall("get_weather", {"city": "Zürich"}, '{"city": "Zürich"}')
    ]


def test_held_back_answer_text_comes_before_the_tool_call(tokenizer):
    # "EN" might start the stop string "END", so it is held back until the tool call shows it is not.
    script = ids(tokenizer, "Checking EN", "<|tools_prefix|>", '[{"now": {}}]', "<|tools_suffix|>")
    events, finish, _ = assemble(tokenizer, script, stop=("END",))
    assert finish == "tool_calls"
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("ToolCall") == len(kinds) - 1
    assert text_of(events) == "Checking EN"


def test_malformed_tool_call_ends_the_turn_as_stop(tokenizer):
    script = ids(tokenizer, "<|tools_prefix|>", "[{not json", "<|tools_suffix|>", "more")
    events, finish, _ = assemble(tokenizer, script)
    assert finish == "stop"
    assert [type(e) for e in events] == [ToolCallError]
    assert "not valid JSON" in events[0].message


def test_stop_string_split_across_tokens(tokenizer):
    script = ids(tokenizer, "The answer is 42. END of text")
    events, finish, _ = assemble(tokenizer, script, stop=("END",))
    assert finish == "stop_string"
    assert text_of(events) == "The answer is 42. "


def test_end_of_turn_token_flushes_held_text(tokenizer):
    script = [*ids(tokenizer, "Bye EN"), 2, *ids(tokenizer, "after")]
    events, finish, consumed = assemble(tokenizer, script, stop=("END",))
    assert finish == "stop" and consumed == script.index(2) + 1
    assert text_of(events) == "Bye EN"


def test_starts_in_reasoning_when_the_prompt_left_it_open(tokenizer):
    script = ids(tokenizer, "still thinking", "<|inner_suffix|>", "Answer.")
    events, finish, _ = assemble(tokenizer, script, start_channel="reasoning")
    assert finish is None
    assert text_of(events, "reasoning") == "still thinking" and text_of(events) == "Answer."
