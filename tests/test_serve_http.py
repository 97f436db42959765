"""The OpenAI-compatible server, driven by the official `openai` client and by raw HTTP."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

import apertus_mlx
from apertus_mlx import ChatSession, Engine, SamplingOptions
from apertus_mlx.load import DEMO_MODEL
from apertus_mlx.serve.http import ServerConfig
from apertus_mlx.serve.requests import Limits

from http_server import RunningServer

KEY = "test-key"
PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


@pytest.fixture(scope="module")
def server():
    running = RunningServer(Engine(DEMO_MODEL).wait_ready(), ServerConfig(api_key=KEY, limits=Limits(max_tokens=2048)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def local():
    return apertus_mlx.load(DEMO_MODEL)


def python_api(local, text, **options):
    model, tokenizer = local
    return ChatSession(model, tokenizer, options=SamplingOptions(**options)).generate(text)


def test_models_and_health(client, server):
    (model,) = client.models.list().data
    assert model.id == "demo model" and model.owned_by == "apertus-mlx"
    health = httpx.get(f"{server.url}/health").json()  # no key needed
    assert health["status"] == "ok" and health["model"] == "demo model"
    assert set(health["memory_gb"]) == {"active", "cache", "peak"} and health["memory_gb"]["active"] > 0


def test_chat_matches_the_python_api_streamed_or_not(client, local):
    options = {"temperature": 0.9, "seed": 7, "max_tokens": 24}
    expected = python_api(local, "Grüezi mitenand", **options)
    messages = [{"role": "user", "content": "Grüezi mitenand"}]
    whole = client.chat.completions.create(model="demo model", messages=messages, **options)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="demo model", messages=messages, stream=True, **options)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 3


def test_usage_logprobs_and_the_prefix_cache(client):
    messages = [{"role": "user", "content": "Tell me about Debian."}]
    first = client.chat.completions.create(
        model="demo model", messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    usage = first.usage
    assert usage.completion_tokens == 12 == len(first.choices[0].logprobs.content)
    assert usage.total_tokens == usage.prompt_tokens + 12
    for entry in first.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= entry.top_logprobs[0].logprob + 1e-6 <= 1e-6
    assert "".join(e.token for e in first.choices[0].logprobs.content) == first.choices[0].message.content
    # The client resends the conversation, grown by the answer and a new question: only the new part is read.
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "More"},
    ]
    second = client.chat.completions.create(model="demo model", messages=messages, max_tokens=4, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= usage.prompt_tokens and second.usage.prompt_tokens - cached < 12


def test_stream_usage_comes_last(client):
    stream = client.chat.completions.create(
        model="demo model",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[0].choices[0].delta.role == "assistant"


def test_raw_completions(client, local):
    model, tokenizer = local
    done = client.completions.create(model="demo model", prompt="The Debian package", max_tokens=8, temperature=0)
    session = ChatSession(model, tokenizer, options=SamplingOptions(temperature=0, max_tokens=8))
    expected = "".join(
        e.text for e in session_complete(session, "The Debian package") if type(e).__name__ == "TextDelta"
    )
    assert done.choices[0].text == expected and done.usage.completion_tokens == 8


def session_complete(session, text):
    import queue

    from apertus_mlx.scheduler import Scheduler

    received = queue.Queue()
    turn = session.new_completion(text, {}, received.put)
    scheduler = Scheduler(session.model)
    scheduler.submit(turn)
    events = []
    while not events or type(events[-1]).__name__ != "Done":
        scheduler.step()
        while not received.empty():
            events.append(received.get())
    return events


def test_three_clients_at_once_get_what_they_get_alone(client):
    prompts = ["Erzähl mir von Bern.", "Parle-moi de Genève.", "Raccontami di Lugano."]

    def ask(prompt):
        messages = [{"role": "user", "content": prompt}]
        answer = client.chat.completions.create(model="demo model", messages=messages, max_tokens=20, temperature=0)
        return answer.choices[0].message.content

    alone = [ask(p) for p in prompts]
    together = [None] * 3

    def run(i):
        together[i] = ask(prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone


def test_a_client_that_disconnects_stops_its_generation(server, client):
    body = {
        "messages": [{"role": "user", "content": "Write a lot."}],
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"role"' not in line:
                break  # the first piece of text: now hang up
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/health").json()["active_requests"]:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.1)
    answer = client.chat.completions.create(
        model="demo model", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert answer.usage.completion_tokens == 3  # the server goes on


BAD = [
    ("malformed JSON", b'{"messages": [', 400, "body"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("wrong type", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    (
        "max_tokens over the limit",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
        400,
        "max_tokens",
    ),
    ("unknown model", {"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("unknown field", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {}}, 400, "logit_bias"),
    (
        "image for a model without a vision tokenizer",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}]},
        400,
        "messages[0].content[0]",
    ),
    (
        "image without a url",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages[0].content[0].image_url.url",
    ),
    (
        "audio content",
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        400,
        "messages[0].content[0].type",
    ),
    ("n > 1", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
]


@pytest.mark.parametrize("what,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client, what, body, status, param):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/chat/completions", content=data, headers=headers)
    assert r.status_code == status
    error = r.json()["error"]
    assert (error["param"] == param and error["message"].startswith(param)) or status == 404
    assert set(error) == {"message", "type", "param", "code"}
    ok = client.chat.completions.create(
        model="demo model", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
    )
    assert ok.usage.completion_tokens == 2


def test_size_keys_and_paths(server):
    url = f"{server.url}/v1/chat/completions"
    big = httpx.post(url, content=b" " * (5 * 1024 * 1024), headers={"Authorization": f"Bearer {KEY}"})
    assert big.status_code == 413 and big.json()["error"]["param"] == "body"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(url, json={"messages": [{"role": "user", "content": "x"}]}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{server.url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["message"] == "no such endpoint: GET /v1/nothing"


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.role"):
        client.chat.completions.create(model="demo model", messages=[{"role": "robot", "content": "x"}])
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "canton": {"type": "string", "enum": ["BE", "ZH", "GE", "TI"]},
        "population": {"type": "integer", "minimum": 0, "maximum": 10_000_000},
    },
    "required": ["city", "canton", "population"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [1, 2])
def test_a_json_schema_response_parses_and_validates(client, seed):
    answer = client.chat.completions.create(
        model="demo model",
        messages=[{"role": "user", "content": "Name a Swiss city as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}},
        temperature=1.0,
        seed=seed,
        max_tokens=200,
    )
    assert answer.choices[0].finish_reason == "stop"
    value = json.loads(answer.choices[0].message.content)
    assert set(value) == {"city", "canton", "population"}
    assert isinstance(value["city"], str) and len(value["city"]) <= 24
    assert value["canton"] in CITY["properties"]["canton"]["enum"]
    assert isinstance(value["population"], int) and 0 <= value["population"] <= 10_000_000


def test_a_bad_response_format_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(
            model="demo model",
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "yaml"},
        )


def test_an_unforeseen_failure_is_a_500_and_frees_its_slot(server, client, monkeypatch):
    async def broken(session, text, **options):
        raise RuntimeError("template exploded")
        yield  # an async generator, like the real one

    monkeypatch.setattr(server.engine, "astream", broken)
    with pytest.raises(openai.InternalServerError, match="template exploded"):
        client.chat.completions.create(model="demo model", messages=[{"role": "user", "content": "x"}])
    monkeypatch.undo()
    assert httpx.get(f"{server.url}/health").json()["active_requests"] == 0
    ok = client.chat.completions.create(
        model="demo model", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
    )
    assert ok.usage.completion_tokens == 2
