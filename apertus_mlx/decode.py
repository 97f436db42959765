"""The token loop: prefill a prompt into a KV cache, then decode one token (or a speculative run) at a time.

This is the hot path. Each step builds the next step's graph before the current token is read
(`mx.async_eval`), so the device never waits on Python; per-token work is the sampler alone.
Everything runs on the calling thread's default stream, since MLX streams are thread-local.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import maybe_quantize_kv_cache

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class KVQuantization:
    """Store the KV cache in `bits` (mlx-lm's QuantizedKVCache) once it holds `start` tokens."""

    bits: int
    group_size: int = 64
    start: int = 0

    def apply(self, cache: list[Any]) -> None:
        maybe_quantize_kv_cache(cache, quantized_kv_start=self.start, kv_group_size=self.group_size, kv_bits=self.bits)


def prefill(
    model: Any,
    tokens: list[int],
    cache: list[Any],
    step_size: int = 2048,
    kv_quant: KVQuantization | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Run `tokens` through the model into `cache`, in chunks that bound peak memory."""
    for start in range(0, len(tokens), step_size):
        model(mx.array(tokens[start : start + step_size])[None], cache=cache)
        if kv_quant:
            kv_quant.apply(cache)
        mx.eval([c.state for c in cache])
        if progress:
            progress(min(start + step_size, len(tokens)), len(tokens))


def _next_token(
    model: Any,
    inputs: mx.array,
    cache: list[Any],
    sampler: Sampler,
    processors: list[LogitsProcessor],
    history: list[int] | None,
    kv_quant: KVQuantization | None,
) -> mx.array:
    logits = model(inputs[None], cache=cache)[:, -1, :]  # (1, vocab)
    if processors:
        context = mx.array(history)
        for process in processors:
            logits = process(context, logits)
    if kv_quant:
        kv_quant.apply(cache)
    return sampler(logits - mx.logsumexp(logits, keepdims=True))  # (1,)


def generate_tokens(
    model: Any,
    prompt: list[int],
    cache: list[Any],
    sampler: Sampler,
    max_tokens: int,
    processors: list[LogitsProcessor] | None = None,
    kv_quant: KVQuantization | None = None,
    prefill_step_size: int = 2048,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[int]:
    """Yield up to `max_tokens` sampled token ids continuing `prompt` (the uncached tail of the context).

    The caller stops early by closing the generator; the cache then holds every yielded token
    but possibly the last (compare its offset).
    """
    processors = processors or []
    history = list(prompt) if processors else None
    prefill(model, prompt[:-1], cache, prefill_step_size, kv_quant, progress)
    y = _next_token(model, mx.array(prompt[-1:]), cache, sampler, processors, history, kv_quant)
    mx.async_eval(y)
    for n in range(max_tokens):
        next_y = None
        if n + 1 < max_tokens:
            if history is not None:
                history.append(y.item())
            next_y = _next_token(model, y, cache, sampler, processors, history, kv_quant)
            mx.async_eval(next_y)
        yield y.item()
        y = next_y
        if n % 256 == 255:
            mx.clear_cache()


def speculative_tokens(
    model: Any,
    draft_model: Any,
    prompt: list[int],
    cache: list[Any],
    draft_cache: list[Any],
    sampler: Sampler,
    max_tokens: int,
    num_draft: int = 3,
    kv_quant: KVQuantization | None = None,
    prefill_step_size: int = 2048,
    progress: Callable[[int, int], None] | None = None,
    on_accept: Callable[[int], None] | None = None,
) -> Iterator[int]:
    """Like `generate_tokens`, but a small draft model proposes `num_draft` tokens that the model checks at once.

    Every yielded token is sampled from the main model given the accepted prefix, so the output follows
    the main model's distribution; the draft only changes how many tokens one forward pass yields.
    Both caches must hold the same tokens on entry.
    """
    prefill(model, prompt[:-1], cache, prefill_step_size, kv_quant, progress)
    prefill(draft_model, prompt[:-1], draft_cache, prefill_step_size)
    last = prompt[-1]
    draft_pending = [last]  # tokens the draft model has not seen yet
    produced = 0
    while produced < max_tokens:
        k = min(num_draft, max_tokens - produced - 1)
        drafted: list[int] = []
        if k > 0:
            inputs = mx.array(draft_pending)
            for _ in range(k):
                logits = draft_model(inputs[None], cache=draft_cache)[:, -1, :]
                inputs = sampler(logits - mx.logsumexp(logits, keepdims=True))
                drafted.append(inputs)
            drafted = mx.concatenate(drafted).tolist()
        logits = model(mx.array([last, *drafted])[None], cache=cache)[0]  # (k + 1, vocab)
        if kv_quant:
            kv_quant.apply(cache)
        verified = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).tolist()
        accepted = 0
        while accepted < len(drafted) and drafted[accepted] == verified[accepted]:
            accepted += 1
        if on_accept:
            on_accept(accepted)
        # The main cache saw `last` and every drafted token; keep only the accepted ones.
        _trim(cache, len(drafted) - accepted)
        # The draft cache saw `draft_pending` and all drafted tokens but the last one.
        _trim(draft_cache, max(len(drafted) - 1 - accepted, 0))
        # If every drafted token was accepted, the draft model has not seen the last one yet.
        draft_pending = drafted[-1:] if drafted and accepted == len(drafted) else []
        for token in [*drafted[:accepted], verified[accepted]]:
            yield token
            produced += 1
        last = verified[accepted]
        draft_pending = [*draft_pending, last]


def _trim(cache: list[Any], n: int) -> None:
    if n > 0:
        for c in cache:
            c.trim(n)
