"""The compiled decode step (`apertus_mlx/decode_step.py`) gives exactly the plain forward's logits and tokens:
step by step across a cache-growth boundary, over chat turns, in a batch, with every KV cache, quantized or not."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import apertus_mlx
from apertus_mlx import ChatSession, SamplingOptions
from apertus_mlx.decode_step import DecodeStep
from apertus_mlx.scheduler import Scheduler

from checkpoints import make_reference, save_reference, silence_special_tokens

GREEDY = SamplingOptions(max_tokens=10, temperature=0)
TURNS = [
    "Grüezi! Wie gaht's? Ich plane eine Wanderung im Berner Oberland.",
    "Tell me about the Aare, the river that runs through Bern, and where it meets the Rhine.",
    "Merci vilmal. Et en français, s'il te plaît : quel temps fera-t-il demain à Lausanne ?",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = silence_special_tokens(make_reference(seed=7, hidden=128, intermediate=256))
    return save_reference(model, tmp_path_factory.mktemp("step") / "ckpt")


@pytest.fixture(scope="module", params=["float32", "bfloat16", "int4"])
def chat_model(request, checkpoint):
    """The tests' checkpoint as saved, cast to bf16, and quantized to 4 bits (g64)."""
    model, tokenizer = apertus_mlx.load(checkpoint)
    if request.param == "int4":
        nn.quantize(model, group_size=64, bits=4)
    else:
        model.set_dtype(getattr(mx, request.param))
    return model, tokenizer


@pytest.fixture
def steps(monkeypatch):
    """Counts the calls that went through the compiled step, so a test cannot pass on the plain path twice."""
    calls = []
    original = DecodeStep.__call__

    def counted(self, inputs, cache):
        calls.append(inputs.shape)
        return original(self, inputs, cache)

    monkeypatch.setattr(DecodeStep, "__call__", counted)
    return calls


def decode(model, prompt: mx.array, count: int, compiled: bool) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits of each decode step, through the compiled step or the plain forward."""
    model.compiled_decode = compiled
    try:
        cache = model.make_cache()
        logits = model(prompt, cache=cache)[:, -1]
        tokens, rows = [], []
        for _ in range(count):
            token = mx.argmax(logits, axis=-1)
            tokens.append(token.item())
            logits = model(token[:, None], cache=cache)[:, -1]
            rows.append(np.array(logits.astype(mx.float32)))
        return tokens, np.stack(rows)
    finally:
        model.compiled_decode = True


@pytest.mark.parametrize("length", [5, 250])
def test_step_logits_equal_the_plain_forward(chat_model, steps, length):
    model, _ = chat_model
    prompt = mx.array(np.random.default_rng(length).integers(40, 300, size=(1, length)))
    count = 20  # from 250 the cache grows past its first 256-slot buffer
    plain_tokens, plain = decode(model, prompt, count, compiled=False)
    assert not steps
    tokens, compiled = decode(model, prompt, count, compiled=True)
    assert len(steps) == count and all(shape == (1, 1) for shape in steps)
    assert tokens == plain_tokens
    np.testing.assert_array_equal(compiled, plain)


def chat(model, tokenizer, compiled: bool, **settings) -> tuple[list[list[int]], int]:
    """Each turn's tokens, and how many tokens the cache has seen."""
    model.compiled_decode = compiled
    try:
        session = ChatSession(model, tokenizer, system="", options=GREEDY, **settings)
        return [list(session.stream(text))[-1].tokens for text in TURNS], session.cache[0].offset
    finally:
        model.compiled_decode = True


@pytest.mark.parametrize(
    "settings", [{}, {"kv_bits": 8, "kv_group_size": 32}, {"max_kv_size": 128}], ids=["kv", "kv8", "rotating"]
)
def test_chat_turns_give_the_plain_tokens(chat_model, steps, settings):
    model, tokenizer = chat_model
    plain, seen = chat(model, tokenizer, compiled=False, **settings)
    assert not steps
    assert chat(model, tokenizer, compiled=True, **settings) == (plain, seen)
    assert len(steps) == len(TURNS) * (GREEDY.max_tokens - 1)  # every token after a turn's first is a step
    assert all(len(tokens) == GREEDY.max_tokens for tokens in plain)
    assert seen > 128  # a rotating cache has wrapped


def together(model, sessions, texts) -> list[list[int]]:
    """One turn of each session, all on one scheduler at once: the tokens of each."""
    scheduler, received = Scheduler(model), [[] for _ in sessions]
    for session, text, out in zip(sessions, texts, received, strict=True):
        scheduler.submit(session.new_turn(text, {}, out.append))
    while scheduler.busy:
        scheduler.step()
    return [events[-1].tokens for events in received]


def solo_plain(model, tokenizer, history: list[dict], text: str) -> list[int]:
    model.compiled_decode = False
    try:
        session = ChatSession(model, tokenizer, system="", options=GREEDY)
        session.messages = [dict(m) for m in history]
        return list(session.stream(text))[-1].tokens
    finally:
        model.compiled_decode = True


def test_batched_compiled_steps_give_each_chats_plain_tokens(chat_model, steps):
    model, tokenizer = chat_model
    sessions = [ChatSession(model, tokenizer, system="", options=GREEDY) for _ in TURNS]
    assert together(model, sessions, TURNS) == [solo_plain(model, tokenizer, [], text) for text in TURNS]
    assert max(shape[0] for shape in steps) == len(TURNS)  # they really decoded as one batch, compiled
    # Second turns: the chats re-enter the batch with caches of different lengths (left-padded).
    histories = [s.messages for s in sessions]
    again = together(model, sessions, ["Und jetzt?"] * len(TURNS))
    assert again == [solo_plain(model, tokenizer, h, "Und jetzt?") for h in histories]


def test_weights_changed_after_the_step_is_built_are_used(checkpoint, steps):
    model, _ = apertus_mlx.load(checkpoint)
    prompt = mx.array([[40, 41, 42, 43]])
    decode(model, prompt, 3, compiled=True)  # builds and traces the compiled step
    layer = model.layers[1]
    layer.mlp.down_proj.weight = 2 * layer.mlp.down_proj.weight
    nn.quantize(model, group_size=64, bits=4)  # every projection swapped for a quantized one
    plain_tokens, plain = decode(model, prompt, 3, compiled=False)
    tokens, compiled = decode(model, prompt, 3, compiled=True)
    assert len(steps) == 6 and tokens == plain_tokens
    np.testing.assert_array_equal(compiled, plain)
