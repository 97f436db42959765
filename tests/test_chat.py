"""ChatSession: streaming, multi-turn cache reuse, stopping, cancel, persistence, speculative decoding."""

import threading

import pytest
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache

import apertus_mlx
from apertus_mlx import ApertusError, ChatSession, Done, SamplingOptions, TextDelta

from checkpoints import make_reference, save_reference, short_context, silence_special_tokens

GREEDY = SamplingOptions(max_tokens=12, temperature=0.0)
TURNS = ["Hello there, Grüezi!", "What is the capital of Switzerland?", "Merci vielmal."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # head_dim 32, so a quantized KV cache can use groups of 32
    model = silence_special_tokens(make_reference(seed=21, hidden=128, intermediate=256))
    return save_reference(model, tmp_path_factory.mktemp("chat") / "ckpt")


@pytest.fixture(scope="module")
def chat_model(checkpoint):
    return apertus_mlx.load(checkpoint)


class CountingModel:
    """Counts the tokens run through the model, to see what prefix reuse really skips."""

    def __init__(self, model):
        self._model, self.tokens_run = model, 0

    def __call__(self, inputs, cache=None):
        self.tokens_run += inputs.shape[1]
        return self._model(inputs, cache=cache)

    def __getattr__(self, name):
        return getattr(self._model, name)


def run(session, text=None, **overrides) -> tuple[list, Done]:
    events = list(session.stream(text, **overrides))
    assert isinstance(events[-1], Done)
    return events[:-1], events[-1]


def test_streamed_text_equals_the_answer_and_one_shot(chat_model):
    model, tokenizer = chat_model
    options = SamplingOptions(max_tokens=16, temperature=0.8, seed=7)
    deltas, done = run(ChatSession(model, tokenizer, options=options), "Hello!")
    streamed = "".join(e.text for e in deltas if isinstance(e, TextDelta) and e.channel == "answer")
    assert streamed == done.answer
    assert done.stats.generated_tokens == len(done.tokens) > 0
    assert apertus_mlx.generate(model, tokenizer, "Hello!", max_tokens=16, temperature=0.8, seed=7) == done.answer
    # The stream's text is what the tokenizer makes of the tokens (special tokens aside).
    assert done.answer == tokenizer.decode(done.tokens, skip_special_tokens=True)


def test_fixed_seed_reproduces_sampling(chat_model):
    model, tokenizer = chat_model
    outputs = {
        seed: ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=24, seed=seed)).generate("Hi")
        for seed in (1, 1, 2)
    }
    again = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=24, seed=1)).generate("Hi")
    assert again == outputs[1]
    assert outputs[1] != outputs[2]


def test_cache_reuse_over_three_turns_equals_greedy_from_scratch(chat_model):
    model, tokenizer = chat_model
    counting = CountingModel(model)
    session = ChatSession(counting, tokenizer, options=GREEDY)
    for turn, text in enumerate(TURNS):
        before = counting.tokens_run
        cached = list(session._cached)
        _, done = run(session, text)
        fresh = ChatSession(model, tokenizer, options=GREEDY)
        fresh.messages = [dict(m) for m in session.messages[:-1]]
        prompt = fresh.render()
        _, scratch = run(fresh)
        assert done.tokens == scratch.tokens, f"turn {turn}"
        assert done.stats.prompt_tokens == scratch.stats.prompt_tokens == len(prompt)
        # Only what differs from the cache was prefilled, and the model saw exactly that much.
        reusable = next(
            (i for i, (a, b) in enumerate(zip(cached, prompt, strict=False)) if a != b), min(len(cached), len(prompt))
        )
        assert done.stats.prefilled_tokens == len(prompt) - min(reusable, len(prompt) - 1)
        if turn:
            assert done.stats.prefilled_tokens < done.stats.prompt_tokens / 2
        assert counting.tokens_run - before == done.stats.prefilled_tokens + len(done.tokens) - 1


def test_edited_history_falls_back_to_the_common_prefix(chat_model):
    model, tokenizer = chat_model
    session = ChatSession(model, tokenizer, options=GREEDY)
    run(session, TURNS[0])
    run(session, TURNS[1])
    session.messages = session.messages[:1]  # keep only the first question, then ask another
    _, done = run(session, "Something else entirely")
    fresh = ChatSession(model, tokenizer, options=GREEDY)
    fresh.messages = [dict(m) for m in session.messages[:-1]]
    _, scratch = run(fresh)
    assert done.tokens == scratch.tokens
    assert 0 < done.stats.prefilled_tokens < done.stats.prompt_tokens


def test_max_tokens_and_length_finish(chat_model):
    model, tokenizer = chat_model
    _, done = run(ChatSession(model, tokenizer), "Hi", max_tokens=5, temperature=0)
    assert done.finish_reason == "length"
    assert len(done.tokens) == 5


def test_eos_ends_the_turn(chat_model):
    model, tokenizer = chat_model
    _, done = run(ChatSession(model, tokenizer, options=GREEDY), "Hi")
    end_token = done.tokens[2]  # pretend this token ends a turn
    saved = set(tokenizer.eos_token_ids)
    tokenizer.eos_token_ids = saved | {end_token}
    try:
        _, stopped = run(ChatSession(model, tokenizer, options=GREEDY), "Hi")
    finally:
        tokenizer.eos_token_ids = saved
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == done.tokens[: done.tokens.index(end_token) + 1]


def test_stop_string_cuts_the_answer(chat_model):
    model, tokenizer = chat_model
    _, full = run(ChatSession(model, tokenizer, options=GREEDY), "Hi", max_tokens=24)
    stop = full.answer[5:8]
    _, done = run(ChatSession(model, tokenizer, options=GREEDY), "Hi", max_tokens=24, stop=(stop,))
    assert done.finish_reason == "stop_string"
    assert done.answer == full.answer[: full.answer.index(stop)]


def test_cancel_from_another_thread_keeps_partial_answer(chat_model):
    model, tokenizer = chat_model
    counting = CountingModel(model)
    session = ChatSession(counting, tokenizer, options=SamplingOptions(max_tokens=10_000, temperature=0))
    events = []
    for event in session.stream("Tell me a very long story"):
        events.append(event)
        if len(events) == 3:
            canceller = threading.Thread(target=session.cancel)
            canceller.start()
            canceller.join()
            run_at_cancel = counting.tokens_run
    done = events[-1]
    assert done.finish_reason == "cancelled"
    # Within one token: the model ran nothing after cancel(), and every token it made is in the answer.
    assert counting.tokens_run == run_at_cancel
    assert len(done.tokens) == run_at_cancel - done.stats.prompt_tokens
    assert done.answer == "".join(e.text for e in events if isinstance(e, TextDelta))
    assert session.messages[-1] == {"role": "assistant", "content": done.answer}
    # The session stays consistent: the next turn matches a fresh greedy run.
    _, next_turn = run(session, "Go on", max_tokens=8)
    fresh = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=8, temperature=0))
    fresh.messages = [dict(m) for m in session.messages[:-1]]
    assert run(fresh)[1].tokens == next_turn.tokens


def test_save_and_restore(chat_model, checkpoint, tmp_path):
    model, tokenizer = chat_model
    session = ChatSession(model, tokenizer, system="Be brief.", options=GREEDY)
    run(session, TURNS[0])
    run(session, TURNS[1])
    file = session.save(tmp_path / "chats" / "one.chat")
    saved = [dict(m) for m in session.messages]
    assert list(file.parent.iterdir()) == [file]  # written atomically: no temporary left behind

    restored = ChatSession.restore(file, model, tokenizer)
    assert restored.messages == session.messages
    assert restored.system == "Be brief." and restored.options == GREEDY
    assert restored.cached_tokens == session.cached_tokens > 0
    _, original_next = run(session, TURNS[2])
    _, restored_next = run(restored, TURNS[2])
    assert restored_next.tokens == original_next.tokens
    assert restored_next.stats.prefilled_tokens == original_next.stats.prefilled_tokens

    # Another model's cache is not reused; the chat is re-read instead.
    other = make_reference(seed=99, hidden=128, intermediate=256)
    other = apertus_mlx.load_model(save_reference(other, tmp_path / "other"))
    moved = ChatSession.restore(file, other, tokenizer)
    assert moved.messages == saved and moved.cached_tokens == 0


def test_restore_rejects_a_file_that_is_not_a_chat(chat_model, tmp_path):
    bad = tmp_path / "bad.chat"
    bad.write_bytes(b"not a chat")
    with pytest.raises(ApertusError, match=r"bad\.chat: not a saved chat"):
        ChatSession.restore(bad, *chat_model)


def test_quantized_kv_cache(chat_model):
    model, tokenizer = chat_model
    with pytest.raises(ApertusError, match="kv_group_size 64 does not divide the head dimension 32"):
        ChatSession(model, tokenizer, kv_bits=8)
    session = ChatSession(model, tokenizer, options=GREEDY, kv_bits=8, kv_group_size=32)
    _, done = run(session, TURNS[0])
    assert isinstance(session.cache[0], QuantizedKVCache)
    plain = run(ChatSession(model, tokenizer, options=GREEDY), TURNS[0])[1]
    assert done.tokens[:3] == plain.tokens[:3]  # 8-bit keys and values barely move the logits
    _, second = run(session, TURNS[1])
    assert second.stats.prefilled_tokens < second.stats.prompt_tokens


def test_max_kv_size_bounds_the_cache(chat_model):
    model, tokenizer = chat_model
    session = ChatSession(model, tokenizer, options=GREEDY, max_kv_size=160)
    for text in TURNS:
        run(session, text)
    assert isinstance(session.cache[0], RotatingKVCache)
    assert session.cache[0].keys.shape[2] <= 160
    assert session.cached_tokens > 160  # the chat is longer than the window


@pytest.mark.parametrize("draft", ["itself", "another-model"])
def test_speculative_decoding_matches_greedy(chat_model, tmp_path, draft):
    model, tokenizer = chat_model
    if draft == "itself":  # every drafted token is right, so each pass yields num_draft + 1 tokens
        draft_model = model
    else:  # a draft that mostly disagrees must not change the output
        draft = make_reference(seed=5, layers=1, hidden=128, intermediate=256)
        draft_model = apertus_mlx.load_model(save_reference(draft, tmp_path / "d"))
    speculative = ChatSession(model, tokenizer, options=GREEDY, draft_model=draft_model, num_draft_tokens=3)
    plain = ChatSession(model, tokenizer, options=GREEDY)
    for text in TURNS[:2]:
        _, fast = run(speculative, text)
        _, slow = run(plain, text)
        assert fast.tokens == slow.tokens
        if draft == "itself":
            assert fast.stats.draft_accepted == len(fast.tokens) - -(-len(fast.tokens) // 4)


def test_empty_prompt_and_bad_options(chat_model):
    model, tokenizer = chat_model
    session = ChatSession(model, tokenizer)
    with pytest.raises(ApertusError, match="empty prompt"):
        session.stream("   ")
    with pytest.raises(ApertusError, match="max_tokens must be at least 1, got 0"):
        session.stream("Hi", max_tokens=0)
    assert session.messages == []


def test_prompt_longer_than_context(tmp_path):
    path = save_reference(make_reference(**short_context(64)), tmp_path / "short")
    model, tokenizer = apertus_mlx.load(path)
    session = ChatSession(model, tokenizer)
    with pytest.raises(ApertusError, match=r"longer than the model's 64-token context"):
        session.stream("word " * 100)
    assert session.messages == []


def test_repetition_penalty_changes_greedy_output(chat_model):
    model, tokenizer = chat_model
    _, plain = run(ChatSession(model, tokenizer, options=GREEDY), "Hi", max_tokens=16)
    _, penalised = run(ChatSession(model, tokenizer, options=GREEDY), "Hi", max_tokens=16, repetition_penalty=1e6)
    assert len(set(plain.tokens)) < len(plain.tokens)  # greedy on random weights loops
    assert len(set(penalised.tokens)) == len(penalised.tokens)  # a huge penalty forbids recent repeats


def test_end_of_turn_tokens(tmp_path):
    # Even when generation_config.json names only </s>, <|assistant_end|> ends a turn.
    path = save_reference(make_reference(), tmp_path / "ckpt")
    (path / "generation_config.json").write_text('{"eos_token_id": 2}')
    tokenizer = apertus_mlx.load_tokenizer(path)
    assert tokenizer.eos_token_ids == {2, tokenizer.convert_tokens_to_ids("<|assistant_end|>")}
