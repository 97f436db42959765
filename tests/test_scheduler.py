"""The scheduler on the calling thread: batching, per-session sampling, cancel paths, rollback, options."""

import datetime
import itertools
import threading
import time

import mlx.core as mx
import pytest

import apertus_mlx
from apertus_mlx import ApertusError, ChatSession, Done, PrefillProgress, SamplingOptions, TextDelta, TokenLogprobs
from apertus_mlx.errors import TurnError
from apertus_mlx.scheduler import Scheduler

from checkpoints import make_reference, save_reference, silence_special_tokens

GREEDY = SamplingOptions(max_tokens=12, temperature=0)
PROMPTS = ["Grüezi!", "What is the capital of Switzerland, and why is it Bern?", "Merci."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = silence_special_tokens(make_reference(seed=31, hidden=128, intermediate=256))
    return save_reference(model, tmp_path_factory.mktemp("sched") / "ckpt")


@pytest.fixture(scope="module")
def chat_model(checkpoint):
    return apertus_mlx.load(checkpoint)


class Wrapped:
    """A model whose calls can be counted, slowed or made to fail."""

    def __init__(self, model, delay_per_token=0.0, fail_on_call=None):
        self._model, self.delay, self.fail_on_call = model, delay_per_token, fail_on_call
        self.calls, self.batch_sizes = 0, []

    def __call__(self, inputs, cache=None):
        self.calls += 1
        self.batch_sizes.append(inputs.shape[0])
        if self.fail_on_call == self.calls:
            raise RuntimeError("[metal::malloc] Attempting to allocate 9999 bytes\nsecond line")
        time.sleep(self.delay * inputs.shape[1])
        return self._model(inputs, cache=cache)

    def __getattr__(self, name):
        return getattr(self._model, name)


def run_together(model, sessions, texts, **overrides):
    """Run one turn of each session on one scheduler, all at once; return their event lists."""
    scheduler = Scheduler(model)
    received = [[] for _ in sessions]
    turns = [s.new_turn(t, overrides, out.append) for s, t, out in zip(sessions, texts, received, strict=True)]
    for turn in turns:
        scheduler.submit(turn)
    while scheduler.busy:
        scheduler.step()
    return received


def test_batched_greedy_tokens_equal_solo(chat_model):
    model, tokenizer = chat_model
    wrapped = Wrapped(model)
    sessions = [ChatSession(wrapped, tokenizer, options=GREEDY) for _ in PROMPTS]
    together = run_together(wrapped, sessions, PROMPTS)
    assert max(wrapped.batch_sizes) == len(PROMPTS)  # they really decoded as one batch
    for text, events, session in zip(PROMPTS, together, sessions, strict=True):
        *_, solo = ChatSession(model, tokenizer, options=GREEDY).stream(text)
        assert events[-1].tokens == solo.tokens and len(solo.tokens) == 12
        assert session.messages[-1]["content"] == solo.answer
    # Second turns: sessions re-enter the batch with caches of different lengths.
    again = run_together(wrapped, sessions, ["Und jetzt?"] * 3)
    for session, events in zip(sessions, again, strict=True):
        fresh = ChatSession(model, tokenizer, system=session.system, options=GREEDY)
        fresh.messages = [dict(m) for m in session.messages[:-1]]
        *_, scratch = fresh.stream()
        assert events[-1].tokens == scratch.tokens


def test_seeded_sampling_is_per_session(chat_model):
    model, tokenizer = chat_model
    options = SamplingOptions(max_tokens=10, temperature=1.0, top_p=1.0, seed=5)
    solo = [ChatSession(model, tokenizer, options=options).generate(t) for t in PROMPTS[:2]]
    sessions = [ChatSession(model, tokenizer, options=options) for _ in range(2)]
    together = run_together(model, sessions, PROMPTS[:2])
    assert [events[-1].answer for events in together] == solo


def test_a_session_joining_mid_answer_gets_its_tokens_early(chat_model):
    model, tokenizer = chat_model
    scheduler = Scheduler(model)
    long, short = [], []
    a = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=60, temperature=0))
    b = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=4, temperature=0))
    scheduler.submit(a.new_turn("Tell me a long story", {}, long.append))
    while not any(isinstance(e, TextDelta) for e in long):
        scheduler.step()
    scheduler.submit(b.new_turn("Hi", {}, short.append))
    while not (short and isinstance(short[-1], Done)):
        scheduler.step()
    assert not isinstance(long[-1], Done)  # B finished while A was still answering
    while scheduler.busy:
        scheduler.step()
    *_, alone = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=60, temperature=0)).stream(
        "Tell me a long story"
    )
    assert long[-1].tokens == alone.tokens


def test_cancel_before_the_turn_starts(chat_model):
    session = ChatSession(*chat_model, options=GREEDY)
    stream = session.stream("Hi")  # submitted, not started
    session.cancel()
    events = list(stream)
    assert [type(e) for e in events] == [Done]
    assert events[0].finish_reason == "cancelled" and events[0].tokens == []
    assert session.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]


def test_closing_the_stream_keeps_exactly_what_was_received(chat_model):
    session = ChatSession(*chat_model, options=SamplingOptions(max_tokens=500, temperature=0))
    stream = session.stream("Tell me everything")
    received = ""
    for event in stream:
        if isinstance(event, TextDelta):
            received += event.text
            if len(received) >= 3:
                break
    stream.close()
    assert session.messages[-1] == {"role": "assistant", "content": received}
    # Regenerating: drop the partial answer and continue from the question; no double assistant message.
    session.messages.pop()
    *_, done = session.stream(None, max_tokens=5)
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[-1]["content"] == done.answer


def test_cancel_during_a_slow_prefill_is_prompt(chat_model):
    model, tokenizer = chat_model
    slow = Wrapped(model, delay_per_token=0.004)  # ~1.2 s to read the prompt below
    session = ChatSession(slow, tokenizer, options=GREEDY)
    stream = session.stream("word " * 300)
    progress = []
    cancelled_at = None
    for event in stream:
        if isinstance(event, PrefillProgress):
            progress.append(event)
            if cancelled_at is None:
                threading.Timer(0.2, session.cancel).start()
                cancelled_at = time.perf_counter() + 0.2
    ended = time.perf_counter()
    assert event.finish_reason == "cancelled" and event.tokens == []
    assert ended - cancelled_at < 1.0
    assert progress and progress[-1].done < progress[-1].total  # stopped part-way through the prompt
    assert all(a.done < b.done for a, b in itertools.pairwise(progress))


def test_prefill_reports_progress_to_the_end(chat_model):
    events = list(ChatSession(*chat_model, options=GREEDY).stream("word " * 200))
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert progress[-1].done == progress[-1].total == events[-1].stats.prefilled_tokens


def test_failure_mid_turn_leaves_the_chat_as_it_was(chat_model):
    model, tokenizer = chat_model
    flaky = Wrapped(model)
    session = ChatSession(flaky, tokenizer, options=GREEDY)
    session.generate("First question")
    before = [dict(m) for m in session.messages]
    flaky.fail_on_call = flaky.calls + 4  # during decoding of the next turn
    events = []
    with pytest.raises(TurnError, match=r"^the turn failed: RuntimeError: \[metal::malloc\] .*bytes$") as caught:
        for event in session.stream("Second question"):
            events.append(event)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert any(isinstance(e, TextDelta) for e in events)  # it failed mid-answer
    assert session.messages == before and not session.busy
    # The next turn is exactly what a chat that never saw the failure gives.
    *_, done = session.stream("Second question")
    fresh = ChatSession(model, tokenizer, system=session.system, options=GREEDY)
    fresh.messages = [dict(m) for m in before]
    *_, expected = fresh.stream("Second question")
    assert done.tokens == expected.tokens


def test_repetition_penalty_does_not_depend_on_the_cache(chat_model):
    model, tokenizer = chat_model
    options = SamplingOptions(max_tokens=10, temperature=0, repetition_penalty=1.5)
    session = ChatSession(model, tokenizer, options=options)
    session.generate("Hello there")
    *_, second = session.stream("Again")
    assert second.stats.prefilled_tokens < second.stats.prompt_tokens  # the cache was used
    fresh = ChatSession(model, tokenizer, system=session.system, options=options)
    fresh.messages = [dict(m) for m in session.messages[:-1]]
    *_, scratch = fresh.stream()
    assert second.tokens == scratch.tokens


def test_logprobs_are_the_models(chat_model):
    model, tokenizer = chat_model
    session = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=3, temperature=0, logprobs=4))
    events = list(session.stream("Hi"))
    done = events[-1]
    logprobs = [e for e in events if isinstance(e, TokenLogprobs)]
    assert [e.token for e in logprobs] == done.tokens
    prompt = session.render(session.messages[:-1])
    logits = model(mx.array(prompt + done.tokens)[None])[0, len(prompt) - 1 :].astype(mx.float32)
    expected = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    for i, event in enumerate(logprobs):
        assert event.logprob == pytest.approx(expected[i, event.token].item(), abs=1e-4)
        assert [t for t, _ in event.top] == mx.argsort(-expected[i])[:4].tolist()
        assert event.top[0][0] == event.token  # greedy: the chosen token is the likeliest
    assert events[0].to_dict()["type"] in {"prefill", "logprobs"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kv_bits": 4, "kv_group_size": 32, "max_kv_size": 256}, "kv_bits cannot be combined with max_kv_size"),
        ({"max_kv_size": 2}, "max_kv_size must be at least 128 tokens to hold a chat, got 2"),
        ({"kv_bits": 7, "kv_group_size": 32}, "kv_bits must be one of"),
        ({"draft_model": "self", "num_draft_tokens": 0}, "num_draft_tokens must be at least 1, got 0"),
        ({"draft_model": "self", "max_kv_size": 256}, "draft model cannot be used with max_kv_size"),
    ],
)
def test_settings_the_caches_cannot_do_are_refused(chat_model, kwargs, message):
    model, tokenizer = chat_model
    if kwargs.get("draft_model") == "self":
        kwargs = {**kwargs, "draft_model": model}
    with pytest.raises(ApertusError, match=message):
        ChatSession(model, tokenizer, **kwargs)


def test_bad_sampling_options_are_one_line():
    with pytest.raises(ApertusError, match=r"^repetition_penalty must be > 0, got -1$"):
        SamplingOptions(repetition_penalty=-1)
    with pytest.raises(ApertusError, match="top_k must be >= 0"):
        SamplingOptions(top_k=-3)


def test_one_turn_at_a_time_per_chat(chat_model):
    session = ChatSession(*chat_model, options=GREEDY)
    first = session.stream("Hi")
    with pytest.raises(ApertusError, match="already has a turn in progress"):
        session.stream("Again")
    first.close()
    assert not session.busy
    assert session.messages[-1]["role"] == "assistant"


def test_the_default_system_text_is_fixed_when_the_chat_is_made(chat_model, monkeypatch, tmp_path):
    model, tokenizer = chat_model
    session = ChatSession(model, tokenizer, options=GREEDY)
    assert f"Current date: {time.strftime('%Y-%m-%d')}" in session.system
    session.generate("Hi")
    path = session.save(tmp_path / "chat")
    prompt = session.render()
    from transformers.utils import chat_template_utils

    class Later(datetime.datetime):  # what the template's strftime_now sees
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2031, 1, 2, tzinfo=tz)

    monkeypatch.setattr(chat_template_utils, "datetime", Later)
    assert "2031-01-02" in ChatSession(model, tokenizer).system  # a new chat has the new date...
    restored = ChatSession.restore(path, model, tokenizer)
    assert restored.render() == prompt  # ...a saved one keeps its own, and so its cached prefix
    *_, done = restored.stream("Und?")
    assert done.stats.prefilled_tokens < done.stats.prompt_tokens / 2


def test_a_turn_queued_behind_a_full_scheduler_is_cancelled_at_once(chat_model, monkeypatch):
    import apertus_mlx.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "MAX_ACTIVE", 1)
    model, tokenizer = chat_model
    scheduler = Scheduler(model)
    first, second = [], []
    a = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=200, temperature=0))
    b = ChatSession(model, tokenizer, options=GREEDY)
    scheduler.submit(a.new_turn("Tell me a long story", {}, first.append))
    scheduler.submit(b.new_turn("Hi", {}, second.append))
    scheduler.step()
    assert not second  # waiting: only one turn may run
    b.cancel()
    scheduler.step()
    assert [type(e) for e in second] == [Done] and second[0].finish_reason == "cancelled"
    assert not any(isinstance(e, Done) for e in first)  # the running turn goes on
