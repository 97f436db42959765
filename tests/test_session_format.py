"""A chat with tools and reasoning, end to end through the scheduler, with both kinds of chat template.

A scripted model makes the turns (it runs the real model, so the KV cache is real, then puts all the
probability on the next scripted token); the test checks that each later prompt starts with exactly the
tokens the cache holds, so only new tokens are read.
"""

import mlx.core as mx
import pytest

import apertus_mlx
from apertus_mlx import ChatSession, Done, SamplingOptions, ToolCall

from checkpoints import make_reference, save_reference
from formats import TEMPLATES, ids

WEATHER = {
    "type": "function",  # OpenAI's wrapper: the published template needs it unwrapped, which the session does
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class Scripted:
    """The real model, but its next token is always the script's (set per turn, from the prompt's end)."""

    def __init__(self, model):
        self._model, self.script, self.start = model, [], 0

    def __call__(self, inputs, cache=None):
        logits = self._model(inputs, cache=cache)
        step = cache[0].offset - self.start
        token = self.script[min(max(step, 0), len(self.script) - 1)]  # prefill chunks: any token
        return mx.where(mx.arange(logits.shape[-1]) == token, 100.0, -100.0) * mx.ones_like(logits)

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.fixture(scope="module", params=["project", "published"])
def chat_model(request, tmp_path_factory):
    path = save_reference(make_reference(seed=3), tmp_path_factory.mktemp(request.param) / "ckpt")
    model, tokenizer = apertus_mlx.load(path)
    tokenizer._tokenizer.chat_template = TEMPLATES[request.param]
    return Scripted(model), tokenizer


def play(session, scripted, text, *script_parts):
    """Run one turn whose tokens are `script_parts`; return (prompt, generated ids, Done)."""
    new = [{"role": "user", "content": text}] if text is not None else []
    prompt = session.render([*session.messages, *new])
    scripted.start, scripted.script = len(prompt), ids(session.tokenizer, *script_parts)
    *_, done = session.stream(text)
    assert isinstance(done, Done)
    assert done.tokens == scripted.script
    return prompt, done


def test_tool_call_and_reasoning_history_keep_the_cache_valid(chat_model):
    scripted, tokenizer = chat_model
    session = ChatSession(scripted, tokenizer, tools=[WEATHER], think=True, options=SamplingOptions(temperature=0))
    prompt1, done1 = play(
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
    assert done1.finish_reason == "tool_calls"
    (call,) = done1.tool_calls
    assert call == ToolCall("get_weather", {"city": "Zürich"}, '{"city": "Zürich"}') and call.id.startswith("call_")
    assert session.messages[-1]["tool_calls"][0]["id"] == call.id
    session.add_tool_result({"temperature": 21}, tool_call_id=call.id)

    # The answer continues inside the open assistant turn: no new <|assistant_start|>.
    prompt2, done2 = play(session, scripted, None, "It is 21 degrees.", "<|assistant_end|>")
    assert prompt2[: len(prompt1) + len(done1.tokens)] == prompt1 + done1.tokens
    assert tokenizer.convert_tokens_to_ids("<|assistant_start|>") not in prompt2[len(prompt1) :]
    assert done2.finish_reason == "stop" and done2.answer == "It is 21 degrees."
    assert done2.stats.prefilled_tokens == len(prompt2) - len(prompt1) - len(done1.tokens)

    prompt3, done3 = play(session, scripted, "Merci!", "Gern geschehen.", "<|assistant_end|>")
    assert prompt3[: len(prompt2) + len(done2.tokens)] == prompt2 + done2.tokens
    assert done3.stats.prefilled_tokens == len(prompt3) - len(prompt2) - len(done2.tokens)
