"""Decoding steps: one batched forward for many sessions, and speculative steps with a draft model.

This is the hot path. A `DecodeBatch` builds the next step's graph before the current tokens are
read (`mx.async_eval`), so the device never waits on Python; the per-token Python is sampling.
Sessions whose caches can share a batch (plain `KVCache`) are merged into mlx-lm's `BatchKVCache`
while two or more decode, and a lone session decodes on its own cache, with no mask.

A member with a grammar (`response_format`) gets its row of logits masked each step; that needs its last
token on the host before the step samples, which is read while the forward pass runs. Members without
one are not touched, and a batch without any runs exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import mlx.core as mx
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models.cache import BatchKVCache, KVCache

from .constraints import bias_rows
from .sampling import PENALTY_CONTEXT, TokenSampler

if TYPE_CHECKING:
    from .constraints import Constraint


@dataclass
class KVQuantization:
    """Store the KV cache in `bits` (mlx-lm's QuantizedKVCache) once it holds `start` tokens."""

    bits: int
    group_size: int = 64
    start: int = 0

    def apply(self, cache: list[Any]) -> None:
        maybe_quantize_kv_cache(cache, quantized_kv_start=self.start, kv_group_size=self.group_size, kv_bits=self.bits)


@dataclass
class Sampled:
    """A token sampled but not read yet (lazy arrays), with its log-probabilities when asked for."""

    token: mx.array  # (1,)
    logprob: mx.array | None = None  # ()
    top: tuple[mx.array, mx.array] | None = None  # ids (k,), log-probabilities (k,)

    def arrays(self) -> list[mx.array]:
        return [self.token, *([self.logprob] if self.logprob is not None else []), *(self.top or ())]


class Member(Protocol):
    """What a `DecodeBatch` needs of a decoding turn."""

    cache: list[Any]
    sampler: TokenSampler
    pending: Sampled | None  # the last sampled token (not read yet), the input of the next step
    upcoming: Sampled | None  # what the next step samples
    recent: list[int]  # the last tokens of the sequence before `pending`, for the repetition penalty
    top_logprobs: int | None
    constraint: Constraint | None  # the answer's grammar (response_format), advanced here token by token


def sample(member: Member, logits: mx.array, last: mx.array | None = None) -> Sampled:
    """Sample `member`'s next token from its row of logits (1, vocab); `last` is its unread last token."""
    history = None
    if member.sampler.needs_history:
        if last is None:  # the first token: the history is the prompt's tail
            history = mx.array(member.recent[-PENALTY_CONTEXT:], dtype=mx.int32)
        else:
            recent = mx.array(member.recent[-(PENALTY_CONTEXT - 1) :], dtype=mx.int32)
            history = mx.concatenate([recent, last.astype(mx.int32)])
    token, logprobs = member.sampler(logits, history)
    if member.top_logprobs is None:
        return Sampled(token)
    chosen = logprobs[0, token[0]]
    k = member.top_logprobs
    if not k:
        return Sampled(token, chosen)
    ids = mx.argpartition(-logprobs[0], k - 1)[:k]
    values = logprobs[0, ids]
    order = mx.argsort(-values)
    return Sampled(token, chosen, (ids[order], values[order]))


class DecodeBatch:
    """Sessions that decode together: one forward per step for all of them.

    The members' unread tokens live in one array, so a step reads them with one host sync.
    """

    def __init__(self, model: Any, kv_quant: KVQuantization | None = None):
        self.model = model
        self.kv_quant = kv_quant  # only for a batch of one: quantized caches are not merged
        self.members: list[Member] = []
        self._merged: list[BatchKVCache] | None = None  # while two or more members decode
        self._tokens: mx.array | None = None  # (members,) the pending tokens, the next step's input
        self._next: mx.array | None = None  # (members,) the tokens the dispatched step samples
        self._constrained = 0  # members with a grammar; while none, a step has no per-row Python

    def add(self, member: Member) -> None:
        """Join between steps, with `member.pending` sampled from its prompt."""
        if len(self.members) == 1:
            pairs = zip(self.members[0].cache, member.cache, strict=True)
            self._merged = [BatchKVCache.merge([a, b]) for a, b in pairs]
        elif self.members:
            for layer, c in zip(self._merged, member.cache, strict=True):
                layer.extend(BatchKVCache.merge([c]))
        token = member.pending.token
        self._tokens = token if self._tokens is None else mx.concatenate([self._tokens, token])
        self.members.append(member)
        self._constrained += member.constraint is not None

    def remove(self, member: Member) -> None:
        """Take `member` out; its own cache gets back its keys and values (then the caller trims it)."""
        i = self.members.index(member)
        keep = [j for j in range(len(self.members)) if j != i]
        if self._merged is not None:
            member.cache[:] = [layer.extract(i) for layer in self._merged]
            if len(keep) == 1:
                self.members[keep[0]].cache[:] = [layer.extract(keep[0]) for layer in self._merged]
                self._merged = None
            else:
                for layer in self._merged:
                    layer.filter(keep)
        self.members.pop(i)
        self._constrained -= member.constraint is not None
        index = mx.array(keep)
        self._tokens = self._tokens[index] if keep and self._tokens is not None else None
        self._next = self._next[index] if keep and self._next is not None else None

    def dispatch(self) -> None:
        """Start the next step: every member's `upcoming` token, computed from its pending one."""
        cache = self._merged if self._merged is not None else self.members[0].cache
        logits = self.model(self._tokens[:, None], cache=cache)[:, -1, :]
        if self.kv_quant:
            self.kv_quant.apply(cache)
        if self._constrained:
            logits = self._constrain(logits)
        if all(m.sampler.plain_greedy and m.top_logprobs is None for m in self.members):
            # The common case shares one argmax: no per-row ops at all.
            self._next = mx.argmax(logits, axis=-1)
            for m in self.members:
                m.upcoming = None
        else:
            for i, m in enumerate(self.members):
                m.upcoming = sample(m, logits[i : i + 1], self._tokens[i : i + 1])
            self._next = mx.concatenate([m.upcoming.token for m in self.members])
        extras = [a for m in self.members if m.upcoming is not None for a in m.upcoming.arrays()[1:]]
        mx.async_eval(self._next, *extras)

    def _constrain(self, logits: mx.array) -> mx.array:
        """Mask the rows of members with a grammar; the others' logits stay as they are.

        A grammar needs its member's pending token before it can say what may follow, so this reads the
        pending tokens now, while the forward pass already runs, and computes the masks meanwhile.
        """
        mx.async_eval(logits)
        tokens = self._tokens.tolist()
        masks = {}
        for i, m in enumerate(self.members):
            if m.constraint is not None:
                m.constraint.advance(tokens[i])
                mask = m.constraint.mask()
                if mask is not None:
                    masks[i] = mask
        return bias_rows(logits, masks) if masks else logits

    def read(self) -> list[int]:
        """The pending tokens, in member order: one host sync for the whole batch."""
        return self._tokens.tolist()

    def advance(self) -> None:
        """After the pending tokens were read: the dispatched step's tokens become the pending ones."""
        self._tokens, self._next = self._next, None
        for m in self.members:
            m.pending, m.upcoming = m.upcoming, None


def speculative_step(
    model: Any,
    draft_model: Any,
    cache: list[Any],
    draft_cache: list[Any],
    sampler: Callable[[mx.array], mx.array],
    last: int,
    draft_pending: list[int],
    num_draft: int,
    kv_quant: KVQuantization | None = None,
) -> tuple[list[int], list[int], int]:
    """One pass: the draft proposes up to `num_draft` tokens after `last`, the model checks them at once.

    Returns (tokens yielded, what the draft has not seen yet, drafted tokens accepted). Every yielded
    token is sampled from the main model given the accepted prefix, so the output follows the main
    model; the draft only changes how many tokens one forward pass yields. Both caches must hold
    the same tokens, except `draft_pending`, on entry.
    """
    drafted: list[int] = []
    if num_draft > 0:
        inputs = mx.array(draft_pending)
        proposals = []
        for _ in range(num_draft):
            logits = draft_model(inputs[None], cache=draft_cache)[:, -1, :]
            inputs = sampler(logits)
            proposals.append(inputs)
        drafted = mx.concatenate(proposals).tolist()
    logits = model(mx.array([last, *drafted])[None], cache=cache)[0]  # (k + 1, vocab)
    if kv_quant:
        kv_quant.apply(cache)
    verified = sampler(logits).tolist()
    accepted = 0
    while accepted < len(drafted) and drafted[accepted] == verified[accepted]:
        accepted += 1
    # The main cache saw `last` and every drafted token; keep only the accepted ones.
    trim(cache, len(drafted) - accepted)
    # The draft cache saw `draft_pending` and all drafted tokens but the last one.
    trim(draft_cache, max(len(drafted) - 1 - accepted, 0))
    # If every drafted token was accepted, the draft model has not seen the last one yet.
    unseen = drafted[-1:] if drafted and accepted == len(drafted) else []
    out = [*drafted[:accepted], verified[accepted]]
    return out, [*unseen, out[-1]], accepted


def trim(cache: list[Any], n: int) -> None:
    if n > 0:
        for c in cache:
            c.trim(n)


def batchable(cache: list[Any]) -> bool:
    """Whether a session's cache can be merged into a batch (plain, unquantized, not rotating)."""
    return all(type(c) is KVCache for c in cache)
