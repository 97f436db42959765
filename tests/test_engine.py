"""The Engine: model loading and every turn on one MLX thread, events consumed on other threads."""

import threading

import pytest

import apertus_mlx
from apertus_mlx import ChatSession, Done, Engine, ModelNotFoundError, SamplingOptions, TextDelta

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
