"""Sampling options and a per-session sampler: filters, repetition penalty and a random key of its own.

Sessions that decode in one batch each sample their own row, so nothing here touches MLX's global
random state: a seeded turn gives the same tokens whether it runs alone or beside others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_repetition_penalty

from .constraints import check_response_format
from .errors import ApertusError

PENALTY_CONTEXT = 20  # tokens the repetition penalty looks back over, as mlx-lm's does


@dataclass(frozen=True)
class SamplingOptions:
    """How each turn is sampled. Defaults are Apertus's recommended temperature 0.8, top-p 0.9."""

    max_tokens: int = 1024
    temperature: float = 0.8  # 0 means greedy
    top_p: float = 0.9
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end the answer (not included in it)
    logprobs: int | None = None  # stream each token's log-probability and this many top alternatives
    # OpenAI's {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}:
    # the answer is generated under the schema's grammar (see constraints.py); None or {"type": "text"}: free.
    response_format: dict[str, Any] | None = None

    def __post_init__(self):
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (
                self.repetition_penalty is None or self.repetition_penalty > 0,
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            ),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in 0..20, got {self.logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ApertusError(message)
        object.__setattr__(self, "_grammar", check_response_format(self.response_format))  # raises if bad
        if isinstance(self.stop, str):  # a lone string would be read as its characters
            object.__setattr__(self, "stop", (self.stop,))

    @property
    def grammar(self) -> str | None:
        """The grammar `response_format` compiles to (checked when these options were made); None: free text."""
        return self._grammar


def new_key(seed: int | None = None) -> mx.array:
    """A PRNG key: from `seed`, or fresh entropy."""
    return mx.random.key(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))


class TokenSampler:
    """Samples one session's next token from its row of logits.

    `history` holds the last tokens of the whole sequence (prompt and generated, cached or not),
    which the repetition penalty reads; the random key advances once per sampled token.
    """

    def __init__(self, options: SamplingOptions, key: mx.array):
        self.options = options
        self.key = key
        self._penalty = (
            make_repetition_penalty(options.repetition_penalty, PENALTY_CONTEXT) if options.repetition_penalty else None
        )

    @property
    def needs_history(self) -> bool:
        return self._penalty is not None

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits, so rows can share one op."""
        return self.options.temperature == 0 and self._penalty is None

    def __call__(self, logits: mx.array, history: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """(token of shape (1,), log-probabilities of shape (1, vocab)) for logits of shape (1, vocab)."""
        if self._penalty is not None and history is not None:
            logits = self._penalty(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        o = self.options
        if o.temperature == 0:
            return mx.argmax(logprobs, axis=-1), logprobs
        filtered = logprobs
        if 0 < o.top_p < 1:
            filtered = apply_top_p(filtered, o.top_p)
        if o.min_p:
            filtered = apply_min_p(filtered, o.min_p)
        if o.top_k:
            filtered = apply_top_k(filtered, o.top_k)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(filtered * (1 / o.temperature), key=sub), logprobs
