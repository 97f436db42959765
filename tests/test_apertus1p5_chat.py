"""Apertus 1.5 in a chat: tools and reasoning work as for Apertus 1, and memory stays bounded with the rotating and
the quantized KV cache.

The checkpoint is test_apertus1p5.py's tiny text-only `Apertus1p5TextForCausalLM` (head dimension 32, so an 8-bit
KV cache can use groups of 32), its reasoning markers the plain tokens 32 and 33. Its chat template here is
templates/apertus1p5_tools_rules.jinja: the 1.5 stand-in with tools by the published format's rules. Tool turns are
made by test_session_format.py's scripted model (the real model and KV cache, the script's next token).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache
from test_apertus1p5 import PLAIN_MARKERS, make_reference, save_reference
from test_session_format import WEATHER, Scripted

import apertus_mlx
from apertus_mlx import ChatSession, Done, SamplingOptions, TextDelta, ToolCall

from formats import ids

TOOLS_TEMPLATE = (Path(__file__).resolve().parent / "templates" / "apertus1p5_tools_rules.jinja").read_text()
GREEDY = SamplingOptions(max_tokens=12, temperature=0.0)
TURNS = [
    "Hello there, Grüezi! How are you today?",
    "What is the capital of Switzerland, and which rivers flow through it?",
    "Merci vielmal. And what about the lakes near Bern?",
    "One more question: how high is the Matterhorn?",
]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = save_reference(make_reference(full=False, seed=7, hidden_size=128), tmp_path_factory.mktemp("1p5") / "ckpt")
    model, tokenizer = apertus_mlx.load(path)
    tokenizer._tokenizer.chat_template = TOOLS_TEMPLATE
    assert model.args.head_dim == 32 and model.args.input_vocab_size > model.args.vocab_size  # a 1.5 model
    inner = [tokenizer.convert_tokens_to_ids(m) for m in PLAIN_MARKERS]
    assert inner == [32, 33] and not set(inner) & set(tokenizer.all_special_ids)
    return model, tokenizer


def play(session, scripted, text, *script_parts) -> tuple[list[int], list, Done]:
    """Run one scripted turn whose tokens are `script_parts`: (prompt, events before Done, Done)."""
    new = [{"role": "user", "content": text}] if text is not None else []
    prompt = session.render([*session.messages, *new])
    scripted.start, scripted.script = len(prompt), ids(session.tokenizer, *script_parts)
    *events, done = session.stream(text)
    assert isinstance(done, Done) and done.tokens == scripted.script
    return prompt, events, done


def run(session, text) -> Done:
    *_, done = session.stream(text)
    assert isinstance(done, Done)
    return done


# ---- (a) tools and reasoning ----------------------------------------------------------------------------------


def test_tool_call_with_reasoning_then_the_result_and_the_answer(loaded):
    model, tokenizer = loaded
    scripted = Scripted(model)
    session = ChatSession(scripted, tokenizer, tools=[WEATHER], think=True, options=SamplingOptions(temperature=0))
    assert session.format.flavor == "openai"
    shown = tokenizer.decode(session.render([{"role": "user", "content": "x"}]))
    tools = "Tool Capabilities:\n// The weather in a city\ntype get_weather = (_: {city: string}) => any;"
    assert f"Deliberation: enabled\n{tools}<|developer_end|>" in shown

    prompt1, events1, done1 = play(
        session,
        scripted,
        "Weather in Zürich?",
        "<|inner_prefix|>",
        "Need the weather.",
        "<|inner_suffix|>",
        "One moment.",
        "<|tools_prefix|>",
        '[{"get_weather": {"city": "Zürich"}}]',
        "<|tools_suffix|>",
    )
    assert done1.tokens[0] == 32 and 33 in done1.tokens  # the plain-token markers were generated
    assert done1.finish_reason == "tool_calls"
    (call,) = done1.tool_calls
    assert call == ToolCall("get_weather", {"city": "Zürich"}, '{"city": "Zürich"}') and call.id.startswith("call_")
    assert [e for e in events1 if isinstance(e, ToolCall)] == [call]
    assert (done1.reasoning, done1.answer) == ("Need the weather.", "One moment.")
    deltas = [e for e in events1 if isinstance(e, TextDelta)]
    assert "".join(e.text for e in deltas if e.channel == "reasoning") == "Need the weather."
    assert "".join(e.text for e in deltas if e.channel == "answer") == "One moment."
    assert session.messages[-1] == {
        "role": "assistant",
        "content": "One moment.",
        "reasoning_content": "Need the weather.",
        "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}
        ],
    }
    session.add_tool_result({"temperature": 21}, tool_call_id=call.id)

    # The answer continues inside the open assistant turn, after the results: no new <|assistant_start|>.
    prompt2, events2, done2 = play(session, scripted, None, "It is 21 degrees.", "<|assistant_end|>")
    assert prompt2[: len(prompt1) + len(done1.tokens)] == prompt1 + done1.tokens
    assert tokenizer.decode(prompt2[len(prompt1) + len(done1.tokens) :]) == '[{"temperature": 21}]'
    assert tokenizer.convert_tokens_to_ids("<|assistant_start|>") not in prompt2[len(prompt1) :]
    assert done2.finish_reason == "stop" and done2.answer == "It is 21 degrees." and not done2.reasoning
    assert {e.channel for e in events2 if isinstance(e, TextDelta)} == {"answer"}
    assert done2.stats.prefilled_tokens == len(prompt2) - len(prompt1) - len(done1.tokens)

    prompt3, _, done3 = play(session, scripted, "Merci!", "Gern geschehen.", "<|assistant_end|>")
    assert prompt3[: len(prompt2) + len(done2.tokens)] == prompt2 + done2.tokens
    assert done3.stats.prefilled_tokens == len(prompt3) - len(prompt2) - len(done2.tokens)


# ---- (b) bounded memory ---------------------------------------------------------------------------------------


def test_rotating_cache_bounds_a_chat_longer_than_max_kv_size(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, options=GREEDY, max_kv_size=128)
    assert all(isinstance(c, RotatingKVCache) for c in session.cache)
    for text in TURNS:
        done = run(session, text)
        assert done.finish_reason in ("stop", "length") and done.tokens  # it still answers
        assert all(c.keys.shape[2] <= 128 and c.size() <= 128 for c in session.cache)
    assert session.cache[0].offset > 128 and session.cached_tokens > 128  # the chat is longer than the window
    assert session.last_stats.prompt_tokens > 128


def test_rotating_cache_is_reused_after_it_wraps(loaded):
    # Answers that re-encode to the tokens generated (the random model's bytes may not): once the window has wrapped,
    # a turn still prefills only its new tokens, as long as the chat's history only grows.
    model, tokenizer = loaded
    scripted = Scripted(model)
    session = ChatSession(scripted, tokenizer, options=GREEDY, max_kv_size=128)
    previous = None
    for text in TURNS:
        prompt, _, done = play(session, scripted, text, "The answer is Bern.", "<|assistant_end|>")
        assert all(c.keys.shape[2] <= 128 for c in session.cache)
        if previous is not None:
            assert prompt[: len(previous)] == previous
            assert done.stats.prefilled_tokens == len(prompt) - len(previous)
        previous = prompt + done.tokens
    assert session.cache[0].offset > 2 * 128  # wrapped well before the last turn


def test_quantized_kv_cache_answers_as_the_16_bit_one(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, options=GREEDY, kv_bits=8, kv_group_size=32)
    done = run(session, TURNS[0])
    assert all(isinstance(c, QuantizedKVCache) for c in session.cache) and session.cache[0].bits == 8
    plain = run(ChatSession(model, tokenizer, options=GREEDY), TURNS[0])
    assert done.tokens[:3] == plain.tokens[:3]  # 8-bit keys and values barely move the logits (as test_chat.py)
    second = run(session, TURNS[1])
    assert second.tokens and second.stats.prefilled_tokens < second.stats.prompt_tokens
