"""Tool calls and reasoning through the server, in OpenAI's shapes, with a scripted model making the turns."""

from __future__ import annotations

import json

import openai
import pytest
from test_session_format import WEATHER, Scripted

import apertus_mlx
import apertus_mlx.engine
from apertus_mlx import ChatSession, Engine
from apertus_mlx.serve.http import ServerConfig

from checkpoints import make_reference, save_reference
from formats import TEMPLATES, ids
from http_server import RunningServer


@pytest.fixture(scope="module")
def scripted_server(tmp_path_factory):
    path = save_reference(make_reference(seed=3), tmp_path_factory.mktemp("tools") / "ckpt")
    model, tokenizer = apertus_mlx.load(path)
    tokenizer._tokenizer.chat_template = TEMPLATES["published"]
    scripted = Scripted(model)
    patch = pytest.MonkeyPatch()
    patch.setattr(apertus_mlx.engine, "load", lambda _: (scripted, tokenizer))
    running = RunningServer(Engine(path).wait_ready(), ServerConfig())
    patch.undo()
    yield running, scripted, tokenizer
    running.stop()


def script(scripted, tokenizer, messages, think, *parts):
    """Make the model answer `messages` with `parts`, as the server will render them."""
    session = ChatSession(scripted, tokenizer, tools=[WEATHER], think=think)
    scripted.start, scripted.script = len(session.render(messages)), ids(tokenizer, *parts)


def test_tool_calls_reasoning_and_tool_results_in_openai_shapes(scripted_server):
    server, scripted, tokenizer = scripted_server
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "Weather in Zürich?"}]
    call_json = '[{"get_weather": {"city": "Zürich"}}]'
    parts = ["<|inner_prefix|>", "Need the weather.", "<|inner_suffix|>", "<|tools_prefix|>", call_json]
    script(scripted, tokenizer, messages, True, *parts, "<|tools_suffix|>")
    first = client.chat.completions.create(
        model="ckpt", messages=messages, tools=[WEATHER], reasoning_effort="high", temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "Need the weather."
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Zürich"}

    # The client sends the assistant message back as it came, and the tool's result.
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "21"},
    ]
    messages[1].pop("refusal", None)
    session = ChatSession(scripted, tokenizer, tools=[WEATHER], think=True)
    session.messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Need the weather.",
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "21"},
    ]
    scripted.start = len(session.render())
    scripted.script = ids(tokenizer, "It is 21 degrees.", "<|assistant_end|>")
    stream = client.chat.completions.create(
        model="ckpt",
        messages=messages,
        tools=[WEATHER],
        reasoning_effort="high",
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "It is 21 degrees."
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens  # the chat was reused


def test_streamed_tool_calls_carry_index_id_and_arguments(scripted_server):
    server, scripted, tokenizer = scripted_server
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "Weather in Bern and Genf?"}]
    calls = '[{"get_weather": {"city": "Bern"}}, {"get_weather": {"city": "Genf"}}]'
    script(scripted, tokenizer, messages, False, "<|tools_prefix|>", calls, "<|tools_suffix|>")
    stream = client.chat.completions.create(model="ckpt", messages=messages, tools=[WEATHER], stream=True)
    deltas = [tc for c in list(stream) if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == [0, 1]
    assert [json.loads(d.function.arguments)["city"] for d in deltas] == ["Bern", "Genf"]
    assert len({d.id for d in deltas}) == 2
