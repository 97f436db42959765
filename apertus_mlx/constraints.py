"""Structured output: OpenAI's `response_format`, enforced token by token with a grammar (llguidance).

`check_response_format` validates a `response_format` when `SamplingOptions` is made and returns the
grammar it compiles to (cached by the schema's text). A turn that asks for JSON gets a `Constraint`: the
grammar's matcher plus where the turn is (reasoning, answer, tool call). Reasoning is free; from the first
answer token on, `mask()` allows only tokens that keep the answer a prefix of a valid value, and only once the
value is complete the end of the turn (`<|assistant_end|>`), which is then the only token allowed. Tool
calls are never allowed in a constrained answer. Why llguidance: docs/constraints.md.
"""

from __future__ import annotations

import functools
import json
import re
import weakref
from typing import Any

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np

from .errors import ResponseFormatError

# JSON as `json.dumps` writes it: no free whitespace (a model cannot pad its answer until max_tokens), ", " and ": ".
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
JSON_OBJECT = {"type": "object"}
TYPES = ("text", "json_object", "json_schema")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_response_format(value: Any) -> str | None:
    """The grammar of an OpenAI `response_format` (None for plain text); a one-line error naming the field."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ResponseFormatError(f"response_format must be a dict such as {{'type': 'json_object'}}, got {value!r}")
    kind = value.get("type")
    if kind not in TYPES:
        raise ResponseFormatError(f"response_format.type must be one of {', '.join(TYPES)}, got {kind!r}")
    _only(value, "response_format", {"type", "json_schema"} if kind == "json_schema" else {"type"})
    if kind == "text":
        return None
    if kind == "json_object":
        return _grammar(json.dumps(JSON_OBJECT))
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ResponseFormatError("response_format.json_schema must be a dict with a name and a schema")
    _only(spec, "response_format.json_schema", {"name", "description", "schema", "strict"})
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ResponseFormatError(
            f"response_format.json_schema.name must be 1-64 letters, digits, _ or -, got {name!r}"
        )
    if not isinstance(spec.get("description", ""), str):
        raise ResponseFormatError("response_format.json_schema.description must be a string")
    if spec.get("strict") not in (None, True, False):
        raise ResponseFormatError(f"response_format.json_schema.strict must be true or false, got {spec['strict']!r}")
    schema = spec.get("schema", {})  # OpenAI's default: any JSON value
    if not isinstance(schema, (dict, bool)):
        raise ResponseFormatError(f"response_format.json_schema.schema must be a JSON schema object, got {schema!r}")
    try:
        text = json.dumps(schema, ensure_ascii=False)  # key order kept: properties are written in the schema's order
    except (TypeError, ValueError) as e:
        raise ResponseFormatError(f"response_format.json_schema.schema: not JSON ({e})") from None
    return _grammar(text)


def _only(value: dict[str, Any], where: str, keys: set[str]) -> None:
    unknown = sorted(str(k) for k in value if k not in keys)
    if unknown:
        raise ResponseFormatError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(keys))})")


@functools.lru_cache(maxsize=256)
def _grammar(schema_text: str) -> str:
    """The llguidance grammar of a JSON schema, checked; every keyword must be enforced (no lenient mode)."""
    where = "response_format.json_schema.schema"
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_text, overrides=JSON_OPTIONS)
    except ValueError as e:
        raise ResponseFormatError(f"{where}: {_one_line(e)}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ResponseFormatError(f"{where}: {_one_line(error)}")
    return grammar


def _one_line(error: Any) -> str:
    text = " ".join(str(error).split())
    return text.split(" <state>")[0][:300]  # a matcher's errors go on with its whole state and grammar


# ---- one turn's state ----------------------------------------------------------------------------------------

_tokenizers: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], llguidance.LLTokenizer]] = (
    weakref.WeakKeyDictionary()
)


def _ll_tokenizer(tokenizer: Any, vocab: int, ends: tuple[int, ...]) -> llguidance.LLTokenizer:
    """llguidance's view of the Hugging Face tokenizer (about 1 s for 131k tokens), made once per tokenizer."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper holds the transformers tokenizer
    per = _tokenizers.setdefault(hf, {})
    key = (vocab, ends)
    if key not in per:
        per[key] = llguidance.hf.from_tokenizer(hf, n_vocab=max(vocab, len(hf)), eos_token=list(ends))
    return per[key]


@functools.lru_cache(maxsize=64)
def _start(ll_tokenizer: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
    """A matcher at the grammar's start, kept so that each turn only copies it (with its lexer caches)."""
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise ResponseFormatError(f"response_format.json_schema.schema: {_one_line(matcher.get_error())}")
    return matcher


class Constraint:
    """One turn's grammar state: `mask()` for the next token, `advance(token)` once it is sampled, `done`.

    `think` lets the answer open with `<|inner_prefix|>` (deliberation first); `start_channel` is where the
    turn begins. Tokens in the reasoning channel, and in tool calls made from it, are not constrained.
    """

    def __init__(self, grammar: str, tokenizer: Any, vocab: int, *, think: bool = False, start_channel: str = "answer"):
        ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in _MARKERS}
        ids = {name: -1 if i is None or i == tokenizer.unk_token_id else i for name, i in ids.items()}  # absent
        self._inner_start, self._inner_end = ids["inner_prefix"], ids["inner_suffix"]
        self._tools_start, self._tools_end = ids["tools_prefix"], ids["tools_suffix"]
        self._markers = [i for i in (self._inner_start, self._inner_end, self._tools_start, self._tools_end) if i >= 0]
        # The turn's own end, <|assistant_end|>, when it is one of the ids that end a turn; else all of those.
        eos = set(tokenizer.eos_token_ids)
        self.ends = (ids["assistant_end"],) if ids["assistant_end"] in eos else tuple(sorted(eos))
        self.vocab = vocab
        self.matcher = _start(_ll_tokenizer(tokenizer, vocab, self.ends), grammar).deep_copy()
        # Made here, on the thread that decodes: MLX streams are per thread.
        self._shifts = mx.arange(32, dtype=mx.uint32)
        self._words = np.zeros((max(vocab, len(tokenizer)) + 31) // 32, dtype=np.uint32)
        self.channel = start_channel  # "answer", "reasoning" or "tools"
        self._resume = start_channel
        self.think = think
        self.started = False  # whether the answer has a token yet
        self.ended = False  # an end-of-turn token was sampled

    @property
    def active(self) -> bool:
        """Whether the next token is masked: in the answer channel, until the turn's end."""
        return self.channel == "answer" and not self.ended

    @property
    def done(self) -> bool:
        """The answer is complete: the end of the turn is the only token allowed."""
        return self.matcher.is_stopped()

    def mask(self) -> mx.array | None:
        """(vocab,) float32: 0 where the next token is allowed, -inf elsewhere; None when it is free."""
        if not self.active:
            return None
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        for marker in self._markers:  # where markers are plain tokens (Apertus 1.5), the grammar sees them as text
            self._words[marker // 32] &= ~np.uint32(1 << (marker % 32))
        if self.think and not self.started and self._inner_start >= 0:  # the answer may still open with deliberation
            self._words[self._inner_start // 32] |= np.uint32(1 << (self._inner_start % 32))
        words = mx.array(self._words)
        allowed = ((words[:, None] >> self._shifts) & 1).reshape(-1)[: self.vocab]
        return mx.where(allowed.astype(mx.bool_), 0.0, -mx.inf)

    def advance(self, token: int) -> None:
        """Account for the sampled `token` (the mask allowed it)."""
        if self.ended:
            return
        if token in self.ends:
            self.ended = True
        elif self.channel == "reasoning":
            if token == self._inner_end:
                self.channel = "answer"
            elif token == self._tools_start:
                self.channel, self._resume = "tools", "reasoning"
        elif self.channel == "tools":
            if token == self._tools_end:
                self.channel = self._resume
        elif not self.started and token == self._inner_start:
            self.channel = "reasoning"
        else:
            self.started = True
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"the grammar refused token {token}: {_one_line(self.matcher.get_error())}")


_MARKERS = ("inner_prefix", "inner_suffix", "tools_prefix", "tools_suffix", "assistant_end")


def bias_rows(logits: mx.array, masks: dict[int, mx.array]) -> mx.array:
    """`logits` (rows, vocab) with each row `i` in `masks` plus its mask; other rows unchanged, bit for bit."""
    if len(masks) == logits.shape[0]:
        return logits + mx.stack([masks[i] for i in range(logits.shape[0])]).astype(logits.dtype)
    bias = mx.zeros(logits.shape, dtype=logits.dtype)
    rows = mx.array(list(masks))
    bias[rows] = mx.stack(list(masks.values())).astype(logits.dtype)
    return logits + bias
