"""The Engine: model loading and every turn on one MLX thread, events consumed on other threads."""

import asyncio
import json
import threading
import time

import pytest

import apertus_mlx
from apertus_mlx import ChatSession, Done, Engine, ModelNotFoundError, SamplingOptions, TextDelta
from apertus_mlx.errors import EngineClosedError

from checkpoints import make_reference, save_reference, silence_special_tokens

GREEDY = SamplingOptions(max_tokens=10, temperature=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_reference(silence_special_tokens(make_reference(seed=12)), tmp_path_factory.mktemp("e") / "ckpt")


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = Engine(checkpoint).wait_ready(timeout=120)
    yield engine
    engine.close(timeout=30)


def test_work_runs_on_the_engine_thread(engine):
    assert engine.call(lambda: threading.current_thread().name).result() == "apertus-mlx"
    assert engine.model_path is not None and engine.note is None


def test_streamed_turns_equal_a_direct_session(engine, checkpoint):
    session = engine.session(options=GREEDY)
    direct = ChatSession(*apertus_mlx.load(checkpoint), options=GREEDY)
    for text in ["Hallo!", "Und jetzt?"]:
        events = list(engine.stream(session, text))
        expected = list(direct.stream(text))
        assert [e for e in events if isinstance(e, TextDelta)] == [e for e in expected if isinstance(e, TextDelta)]
        assert events[-1].tokens == expected[-1].tokens
    assert session.messages == direct.messages


def test_errors_reach_the_caller(engine):
    session = engine.session()
    with pytest.raises(apertus_mlx.ApertusError, match="empty prompt"):
        list(engine.stream(session, "  "))
    assert engine.call(lambda: 41 + 1).result() == 42  # the thread survives


def test_abandoning_a_stream_cancels_the_turn(engine):
    session = engine.session(options=SamplingOptions(max_tokens=100_000, temperature=0))
    stream = engine.stream(session, "Tell me everything")
    next(stream)
    stream.close()
    # The turn ends cancelled and the engine takes the next job.
    assert engine.call(lambda: session.messages[-1]["role"]).result(timeout=60) == "assistant"
    *_, done = engine.stream(session, "Shorter please", max_tokens=3)
    assert isinstance(done, Done) and done.finish_reason == "length"


def test_load_failure_is_reported():
    engine = Engine("/no/such/model")
    with pytest.raises(ModelNotFoundError, match="model path /no/such/model does not exist"):
        engine.wait_ready(timeout=60)
    assert engine.call(lambda: "still serving").result(timeout=10) == "still serving"
    engine.close(timeout=10)


def test_a_second_client_is_answered_while_the_first_still_streams(engine, tmp_path):
    long = engine.session(options=SamplingOptions(max_tokens=300, temperature=0))
    times = {}

    def client_a():
        for event in engine.stream(long, "Tell me a long story"):
            if isinstance(event, TextDelta):
                times.setdefault("a_first", time.perf_counter())
        times["a_done"] = time.perf_counter()

    a = threading.Thread(target=client_a)
    a.start()
    while "a_first" not in times:
        time.sleep(0.01)
    # Making a chat and saving one wait for no turn: A is still answering when both return.
    short = engine.session(options=SamplingOptions(max_tokens=5, temperature=0))
    engine.save(short, tmp_path / "empty.chat")
    assert "a_done" not in times
    events = list(engine.stream(short, "Hi"))
    times["b_done"] = time.perf_counter()
    a.join()
    assert events[-1].finish_reason == "length"
    assert times["b_done"] < times["a_done"]  # B did not wait behind A's 300 tokens


def test_concurrent_greedy_turns_equal_solo_ones(engine, checkpoint):
    direct_model, direct_tok = apertus_mlx.load(checkpoint)
    prompts = ["Grüezi mitenand", "Bonjour, comment ça va aujourd'hui?", "Hi"]
    results = {}

    def client(text):
        chat = engine.session(options=GREEDY)
        results[text] = list(engine.stream(chat, text))[-1].tokens

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for text in prompts:
        *_, solo = ChatSession(direct_model, direct_tok, options=GREEDY).stream(text)
        assert results[text] == solo.tokens


def test_closing_the_stream_early_keeps_what_the_consumer_saw(engine):
    chat = engine.session(options=SamplingOptions(max_tokens=400, temperature=0))
    stream = engine.stream(chat, "Tell me everything")
    seen = ""
    for event in stream:
        if isinstance(event, TextDelta):
            seen += event.text
            if len(seen) >= 3:
                break
    time.sleep(0.3)  # the engine runs on meanwhile; what it made after this point must not count
    stream.close()
    assert chat.messages[-1] == {"role": "assistant", "content": seen}
    assert not chat.busy


def test_cancel_while_queued_ends_at_once_with_no_tokens(engine):
    chat = engine.session(options=GREEDY)
    engine.call(time.sleep, 0.5)  # the engine is busy, so the turn below waits in its queue
    stream = engine.stream(chat, "Hi")
    chat.cancel()
    events = list(stream)
    assert [type(e) for e in events] == [Done]
    assert events[0].finish_reason == "cancelled" and events[0].tokens == []
    assert chat.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]


def test_restore_and_save_through_the_engine(engine, tmp_path):
    chat = engine.session(options=GREEDY)
    list(engine.stream(chat, "Hallo!"))
    path = engine.save(chat, tmp_path / "chat.safetensors")
    restored = engine.restore(path)  # loaded on the engine thread, so its arrays belong there
    assert restored.messages == chat.messages and restored.cached_tokens == chat.cached_tokens
    *_, again = engine.stream(restored, "Und jetzt?")
    *_, original = engine.stream(chat, "Und jetzt?")
    assert again.tokens == original.tokens
    assert again.stats.prefilled_tokens == original.stats.prefilled_tokens


def test_a_chat_restored_on_another_thread_runs_on_the_engine(engine, tmp_path):
    chat = engine.session(options=GREEDY)
    list(engine.stream(chat, "Hallo!"))
    path = engine.save(chat, tmp_path / "c")
    restored = ChatSession.restore(path, engine.model, engine.tokenizer)  # on this (UI) thread
    *_, done = engine.stream(restored, "Weiter")
    *_, expected = engine.stream(chat, "Weiter")
    assert done.tokens == expected.tokens and done.stats.prefilled_tokens == expected.stats.prefilled_tokens


def test_astream_yields_the_same_events(engine):
    chat = engine.session(options=GREEDY)
    twin = engine.session(options=GREEDY)

    async def collect():
        return [e async for e in engine.astream(chat, "Hallo!")]

    events = asyncio.run(collect())
    expected = list(engine.stream(twin, "Hallo!"))
    assert [e for e in events if isinstance(e, TextDelta)] == [e for e in expected if isinstance(e, TextDelta)]
    assert events[-1].tokens == expected[-1].tokens
    assert json.loads(json.dumps(events[-1].to_dict()))["type"] == "done"


def test_close_cancels_running_turns_and_refuses_new_work(checkpoint):
    engine = Engine(checkpoint).wait_ready(timeout=120)
    chat = engine.session(options=SamplingOptions(max_tokens=100_000, temperature=0))
    stream = engine.stream(chat, "Tell me everything")
    next(stream)
    started = time.perf_counter()
    engine.close()
    assert time.perf_counter() - started < 5
    events = list(stream)
    assert events[-1].finish_reason == "cancelled"
    for attempt in (lambda: engine.call(lambda: 1), lambda: engine.stream(chat, "Hi"), engine.session):
        with pytest.raises(EngineClosedError, match="the engine is closed"):
            attempt()
