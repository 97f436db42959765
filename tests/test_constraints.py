"""Structured output: `response_format` makes the answer valid JSON (of a schema), decoding alone or batched."""

import json
import math
import threading

import mlx.core as mx
import pytest

import apertus_mlx
from apertus_mlx import ApertusError, ChatSession, Done, Engine, SamplingOptions, TokenLogprobs
from apertus_mlx.constraints import check_response_format
from apertus_mlx.decode import DecodeBatch
from apertus_mlx.load import DEMO_MODEL

from checkpoints import make_reference, save_reference, silence_special_tokens
from formats import ids

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "canton": {"enum": ["ZH", "BE", "GE", "TI"]},
        "population": {"type": "integer", "minimum": 0, "maximum": 999999},
        "capital": {"type": "boolean"},
        "languages": {"type": "array", "items": {"enum": ["de", "fr", "it", "rm"]}, "minItems": 1, "maxItems": 3},
        "location": {"$ref": "#/$defs/point"},
        "mayor": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
    },
    "required": ["city", "canton", "population", "capital", "languages", "location"],
    "additionalProperties": False,
    "$defs": {
        "point": {
            "type": "object",
            "properties": {"lat": {"type": "integer", "minimum": -90, "maximum": 90}},
            "required": ["lat"],
            "additionalProperties": False,
        }
    },
}
SMALL = {  # a finite language: any model ends it within a few tokens
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["color", "n"],
    "additionalProperties": False,
}


def schema_format(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def valid_city(value):
    """What a JSON-schema validator would say of `value` against CITY (jsonschema is not a dependency)."""
    assert isinstance(value, dict) and set(value) <= set(CITY["properties"])
    assert set(CITY["required"]) <= set(value)
    assert isinstance(value["city"], str) and len(value["city"]) <= 12
    assert value["canton"] in ["ZH", "BE", "GE", "TI"]
    assert type(value["population"]) is int and 0 <= value["population"] <= 999999
    assert type(value["capital"]) is bool
    assert 1 <= len(value["languages"]) <= 3 and set(value["languages"]) <= {"de", "fr", "it", "rm"}
    assert set(value["location"]) == {"lat"} and type(value["location"]["lat"]) is int
    assert -90 <= value["location"]["lat"] <= 90
    mayor = value.get("mayor")
    assert mayor is None or (isinstance(mayor, str) and len(mayor) <= 8)


@pytest.fixture(scope="module")
def demo():
    return apertus_mlx.load(DEMO_MODEL)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = silence_special_tokens(make_reference(seed=21, hidden=128, intermediate=256))
    return save_reference(model, tmp_path_factory.mktemp("constraints") / "ckpt")


class Scripted:
    """The real model, but all the probability on the script's next token (see test_session_format.py)."""

    def __init__(self, model):
        self._model, self.script, self.start = model, [], 0

    def __call__(self, inputs, cache=None):
        logits = self._model(inputs, cache=cache)
        step = cache[0].offset - self.start
        token = self.script[min(max(step, 0), len(self.script) - 1)]
        # The others keep the model's order far below, so a masked-out script token leaves a real choice.
        return mx.where(mx.arange(logits.shape[-1]) == token, 100.0, logits - 100.0)

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.fixture(scope="module")
def scripted(checkpoint):
    model, tokenizer = apertus_mlx.load(checkpoint)
    return Scripted(model), tokenizer


def play(session, scripted, text, *parts):
    prompt = session.render([*session.messages, {"role": "user", "content": text}])
    scripted.start, scripted.script = len(prompt), ids(session.tokenizer, *parts)
    *_, done = session.stream(text)
    assert isinstance(done, Done)
    return done


# ---- the answer is always valid -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_sampled_answers_always_validate(demo, seed):
    model, tokenizer = demo
    options = SamplingOptions(
        max_tokens=200, temperature=1.0, top_p=1.0, seed=seed, response_format=schema_format(CITY)
    )
    *_, done = ChatSession(model, tokenizer, options=options).stream("Describe Bern.")
    assert done.finish_reason == "stop"
    value = json.loads(done.answer)
    valid_city(value)
    assert list(value) == [key for key in CITY["properties"] if key in value]  # in the schema's order, as OpenAI's
    assert done.tokens[-1] == tokenizer.convert_tokens_to_ids("<|assistant_end|>")  # the turn ends at the grammar's end


def test_filters_and_penalty_work_under_a_mask(demo):
    model, tokenizer = demo
    for seed, extra in enumerate([{"top_k": 5}, {"min_p": 0.2, "top_p": 0.5}, {"repetition_penalty": 1.3}]):
        options = SamplingOptions(max_tokens=200, temperature=1.0, seed=seed, response_format=schema_format(CITY))
        answer = ChatSession(model, tokenizer, options=options).generate("Describe Bern.", **extra)
        valid_city(json.loads(answer))


def test_json_object_gives_an_object(demo, scripted):
    model, tokenizer = demo
    for seed in range(4):
        options = SamplingOptions(max_tokens=60, temperature=1.0, seed=seed, response_format={"type": "json_object"})
        *_, done = ChatSession(model, tokenizer, options=options).stream("Bern as JSON, please.")
        assert done.answer.startswith("{")  # a tiny model may write one string until max_tokens
        if done.finish_reason == "stop":
            assert isinstance(json.loads(done.answer), dict)
        else:
            assert done.finish_reason == "length" and len(done.tokens) == 60
    # A model that would answer with a list answers with an object; a valid object passes untouched.
    scripted_model, tok = scripted
    free = ChatSession(scripted_model, tok, options=SamplingOptions(max_tokens=40, temperature=0))
    assert play(free, scripted_model, "JSON?", "[1, 2]", "<|assistant_end|>").answer == "[1, 2]"
    options = SamplingOptions(max_tokens=40, temperature=0, response_format={"type": "json_object"})
    session = ChatSession(scripted_model, tok, options=options)
    assert play(session, scripted_model, "JSON?", "[1, 2]", "<|assistant_end|>").answer.startswith("{")
    done = play(session, scripted_model, "JSON?", '{"a": [1, 2], "b": {"c": null}}', "<|assistant_end|>")
    assert json.loads(done.answer) == {"a": [1, 2], "b": {"c": None}} and done.finish_reason == "stop"


def test_a_valid_answer_passes_untouched_and_the_grammar_decides_the_end(scripted):
    model, tokenizer = scripted
    a = {"type": "integer", "minimum": 0, "maximum": 99}
    fmt = schema_format({"type": "object", "properties": {"a": a}, "required": ["a"], "additionalProperties": False})
    session = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=40, temperature=0, response_format=fmt))
    end = tokenizer.convert_tokens_to_ids("<|assistant_end|>")
    # The model wants to go on after the value: the turn ends at its last brace.
    done = play(session, model, "Go", '{"a": 5}', " and more text", "<|assistant_end|>")
    assert (done.answer, done.finish_reason, done.tokens[-1]) == ('{"a": 5}', "stop", end)
    # The model wants to stop inside the value: it may not.
    done = play(session, model, "Go", '{"a": 1', "<|assistant_end|>")
    assert done.finish_reason == "stop" and done.tokens[-1] == end
    assert done.answer.startswith('{"a": 1') and 0 <= json.loads(done.answer)["a"] <= 99
    assert session.messages[-1]["content"] == done.answer


def test_reasoning_is_free_and_the_answer_is_constrained(scripted):
    model, tokenizer = scripted
    fmt = schema_format(SMALL)
    script = (
        "<|inner_prefix|>",
        "Let me think {not JSON",
        "<|inner_suffix|>",
        '{"color": "red", "n": 3}',
        "<|assistant_end|>",
    )
    think = ChatSession(
        model, tokenizer, think=True, options=SamplingOptions(max_tokens=60, temperature=0, response_format=fmt)
    )
    done = play(think, model, "Which?", *script)
    assert (done.reasoning, done.answer, done.finish_reason) == (
        "Let me think {not JSON",
        '{"color": "red", "n": 3}',
        "stop",
    )
    # Without deliberation the same script cannot open a reasoning section: the answer is JSON from its first token.
    plain = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=60, temperature=0, response_format=fmt))
    done = play(plain, model, "Which?", *script)
    assert done.reasoning == "" and json.loads(done.answer)["color"] in {"red", "green", "blue"}


def test_no_tool_calls_in_a_constrained_answer(scripted):
    model, tokenizer = scripted
    tool = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    options = SamplingOptions(max_tokens=60, temperature=0, response_format=schema_format(SMALL))
    session = ChatSession(model, tokenizer, tools=[tool], options=options)
    done = play(
        session, model, "Weather?", "<|tools_prefix|>", '[{"get_weather": {"city": "Bern"}}]', "<|tools_suffix|>"
    )
    assert done.tool_calls == [] and done.finish_reason == "stop"
    assert set(json.loads(done.answer)) == {"color", "n"}


def test_logprobs_are_those_after_the_mask(demo):
    model, tokenizer = demo
    options = SamplingOptions(max_tokens=200, temperature=1.0, seed=3, logprobs=5, response_format=schema_format(CITY))
    events = list(ChatSession(model, tokenizer, options=options).stream("Describe Bern."))
    done = events[-1]
    logprobs = [e for e in events if isinstance(e, TokenLogprobs)]
    assert [e.token for e in logprobs] == done.tokens
    for e in logprobs:
        assert math.isfinite(e.logprob) and all(math.isfinite(p) for _, p in e.top)
        assert sum(math.exp(p) for _, p in e.top) <= 1.02  # bf16 weights: log-probabilities to about 3 digits
    # Where the grammar allows a single token (here the end of the turn), it has all the probability.
    assert logprobs[-1].logprob == pytest.approx(0.0, abs=1e-5) and len(logprobs[-1].top) == 1


# ---- batched with unconstrained chats -------------------------------------------------------------------------


def test_constrained_and_free_chats_share_one_engine(checkpoint, monkeypatch):
    greedy = SamplingOptions(max_tokens=30, temperature=0)
    model, tokenizer = apertus_mlx.load(checkpoint)
    alone = ChatSession(model, tokenizer, options=greedy).stream("Tell me about Bern.")
    *_, alone = alone

    sizes = []
    original = DecodeBatch._constrain

    def spy(self, logits):
        sizes.append(len(self.members))
        return original(self, logits)

    monkeypatch.setattr(DecodeBatch, "_constrain", spy)
    engine = Engine(checkpoint).wait_ready(timeout=120)
    try:
        free = engine.session(options=greedy)
        others = [
            engine.session(options=SamplingOptions(max_tokens=30, temperature=t, seed=i, response_format=f))
            for i, (t, f) in enumerate([(1.0, schema_format(SMALL)), (0.0, schema_format(SMALL)), (1.0, None)])
        ]
        streams = [engine.stream(s, "Tell me about Bern.") for s in [free, *others]]
        results = [None] * len(streams)

        def consume(i):
            *_, results[i] = streams[i]

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(streams))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        engine.close(timeout=30)
    assert max(sizes) >= 3  # the free chat decoded in one batch with the constrained ones
    assert results[0].tokens == alone.tokens and len(alone.tokens) == 30
    for done in results[1:3]:  # the two with a grammar
        value = json.loads(done.answer)
        assert done.finish_reason == "stop" and value["color"] in {"red", "green", "blue"} and 0 <= value["n"] <= 9


# ---- options --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("json", r"response_format must be a dict"),
        ({"type": "xml"}, r"response_format.type must be one of text, json_object, json_schema, got 'xml'"),
        ({"type": "json_object", "schema": {}}, r"response_format: unknown key 'schema'"),
        ({"type": "json_schema"}, r"response_format.json_schema must be a dict"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, r"response_format.json_schema.name must be"),
        ({"type": "json_schema", "json_schema": {"name": "a b"}}, r"response_format.json_schema.name must be"),
        ({"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}}, r"json_schema.strict must be"),
        ({"type": "json_schema", "json_schema": {"name": "a", "schema": []}}, r"json_schema.schema must be a JSON"),
        (schema_format({"type": "strin"}), r"response_format.json_schema.schema: .*strin"),
        (schema_format({"type": "string", "pattern": "(["}), r"response_format.json_schema.schema: regex parse error"),
        (schema_format({"$ref": "#/$defs/missing"}), r"response_format.json_schema.schema: .*missing"),
        (schema_format({"type": "array", "uniqueItems": True}), r"schema: Unimplemented keys: \[\"uniqueItems\"\]"),
    ],
)
def test_bad_response_formats_are_one_line_errors(value, message):
    with pytest.raises(ValueError, match=message) as info:
        SamplingOptions(response_format=value)
    assert isinstance(info.value, ApertusError) and "\n" not in str(info.value)


def test_good_response_formats(demo, tmp_path):
    assert SamplingOptions(response_format={"type": "text"}).grammar is None
    assert SamplingOptions(response_format={"type": "json_object"}).grammar is not None
    # The grammar is compiled once per schema text.
    assert check_response_format(schema_format(CITY)) is check_response_format(schema_format(dict(CITY)))
    model, tokenizer = demo
    session = ChatSession(model, tokenizer, options=SamplingOptions(response_format=schema_format(SMALL)))
    session.save(tmp_path / "chat.safetensors")
    restored = ChatSession.restore(tmp_path / "chat.safetensors", model, tokenizer)
    assert restored.options.response_format == schema_format(SMALL)


def test_a_draft_model_is_refused(demo):
    model, tokenizer = demo
    fmt = {"type": "json_object"}
    with pytest.raises(ApertusError, match="response_format is not supported with a draft model"):
        ChatSession(model, tokenizer, options=SamplingOptions(response_format=fmt), draft_model=model)
    session = ChatSession(model, tokenizer, draft_model=model)
    with pytest.raises(ApertusError, match="response_format is not supported with a draft model"):
        session.stream("Hi", response_format=fmt)
