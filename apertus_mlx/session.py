"""`ChatSession`: a multi-turn Apertus chat that streams typed events and reuses its KV cache across turns."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .decode import KVQuantization, generate_tokens, speculative_tokens
from .errors import ApertusError
from .events import Done, Event, Stats, TextDelta, ToolCall, ToolCallError
from .turn_parser import TurnParser


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

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ApertusError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ApertusError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ApertusError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ApertusError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class ChatSession:
    """A chat with one model: `stream(text)` yields events for the next assistant turn.

    Turn N prefills only the tokens that differ from what the KV cache already holds, so a long chat
    costs only its new tokens. `cancel()` may be called from any thread; the partial answer is kept.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        system: str | None = None,
        think: bool = False,
        tools: list[dict[str, Any]] | None = None,
        options: SamplingOptions | None = None,
        *,
        draft_model: Any | None = None,
        num_draft_tokens: int = 3,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        max_kv_size: int | None = None,
        prefill_step_size: int = 2048,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.system, self.think, self.tools = system, think, tools
        self.options = options or SamplingOptions()
        self.messages: list[dict[str, Any]] = []
        self.draft_model, self.num_draft_tokens = draft_model, num_draft_tokens
        if kv_bits and model.args.head_dim % kv_group_size:
            raise ApertusError(
                f"kv_group_size {kv_group_size} does not divide the head dimension {model.args.head_dim}"
            )
        self.kv_quant = KVQuantization(kv_bits, kv_group_size) if kv_bits else None
        self.max_kv_size = max_kv_size
        self.prefill_step_size = prefill_step_size
        self.last_stats: Stats | None = None
        self._accepted = 0  # draft tokens accepted in the current turn
        self._cancel = threading.Event()
        self._cache: list[Any] = []
        self._cached: list[int] = []  # the tokens whose keys and values `_cache` holds
        self._draft_cache: list[Any] = []
        self._draft_cached: list[int] = []
        self.reset_cache()

    # ---- conversation -------------------------------------------------------------------------

    def stream(self, user_text: str | None = None, **overrides: Any) -> Iterator[Event]:
        """Add `user_text` (if given) and stream the assistant's reply as events, ending with `Done`.

        `overrides` replace fields of `options` for this turn only (e.g. `temperature=0`).
        With `user_text=None` the model continues the conversation as it stands, e.g. after
        `add_tool_result`.
        """
        options = replace(self.options, **overrides) if overrides else self.options
        messages = self.messages
        if user_text is not None:
            if not user_text.strip():
                raise ApertusError("empty prompt: nothing to answer")
            messages = [*messages, {"role": "user", "content": user_text}]
        elif not messages:
            raise ApertusError("empty prompt: the chat has no messages yet")
        if self.draft_model is not None and options.repetition_penalty:
            raise ApertusError("repetition_penalty is not supported with a draft model")
        prompt = self.render(messages)
        self._check_context(prompt)
        self.messages = messages
        self._cancel.clear()
        return self._turn(prompt, options)

    def generate(self, user_text: str, **overrides: Any) -> str:
        """The whole answer to `user_text` as one string."""
        done = [e for e in self.stream(user_text, **overrides) if isinstance(e, Done)]
        return done[0].answer

    def cancel(self) -> None:
        """Stop the running turn after the current token (safe from any thread)."""
        self._cancel.set()

    def add_tool_result(self, content: Any) -> None:
        """Append a tool's result; then call `stream()` to let the model continue."""
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        self.messages.append({"role": "tool", "content": text})

    def render(self, messages: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of the chat (with the generation prompt), by the checkpoint's own chat template."""
        messages = self.messages if messages is None else messages
        if self.system is not None:
            messages = [{"role": "system", "content": self.system}, *messages]
        kwargs: dict[str, Any] = {"enable_thinking": self.think}
        if self.tools:
            kwargs["tools"] = self.tools
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs))

    # ---- KV cache -----------------------------------------------------------------------------

    def reset_cache(self) -> None:
        """Forget the KV cache; the next turn re-reads the whole chat."""
        self._cache = self.model.make_cache(max_kv_size=self.max_kv_size)
        self._cached = []
        if self.draft_model is not None:
            self._draft_cache = self.draft_model.make_cache(max_kv_size=self.max_kv_size)
            self._draft_cached = []

    @property
    def cached_tokens(self) -> int:
        """How many tokens of the chat the KV cache holds."""
        return len(self._cached)

    def _reuse_prefix(self, prompt: list[int]) -> int:
        """Trim the caches to their longest common prefix with `prompt`; return its length."""
        keep = _common_prefix(self._cached, prompt)
        if self.draft_model is not None:
            keep = min(keep, _common_prefix(self._draft_cached, prompt))
        keep = min(keep, len(prompt) - 1)  # the last prompt token must be run to get logits
        for cache, cached in self._caches():
            drop = len(cached) - keep
            if drop and not all(c.is_trimmable() for c in cache):
                self.reset_cache()  # e.g. a rotating cache that has already wrapped around
                return 0
            if drop:
                for c in cache:
                    c.trim(drop)
                del cached[keep:]
        return keep

    def _caches(self) -> list[tuple[list[Any], list[int]]]:
        pairs = [(self._cache, self._cached)]
        if self.draft_model is not None:
            pairs.append((self._draft_cache, self._draft_cached))
        return pairs

    def _record_cached(self, tokens: list[int]) -> None:
        """After a turn, note what each cache holds (the decode loop may have run ahead of what was kept)."""
        for cache, cached in self._caches():
            offset = cache[0].offset
            if offset > len(tokens):
                for c in cache:
                    c.trim(offset - len(tokens))
                offset = len(tokens)
            cached[:] = tokens[:offset]

    def _check_context(self, prompt: list[int]) -> None:
        limit = self.model.args.max_position_embeddings
        if self.max_kv_size is None and len(prompt) >= limit:
            raise ApertusError(
                f"the chat is {len(prompt)} tokens, longer than the model's {limit}-token context; "
                "start a new chat or set max_kv_size"
            )

    # ---- one turn -----------------------------------------------------------------------------

    def _turn(self, prompt: list[int], options: SamplingOptions) -> Iterator[Event]:
        start = time.perf_counter()
        mx.reset_peak_memory()
        if options.seed is not None:
            mx.random.seed(options.seed)
        reused = self._reuse_prefix(prompt)
        tokens = self._tokens(prompt[reused:], options)

        parser = TurnParser(self.tokenizer)
        stops = _StopMatcher(options.stop)
        answer: list[str] = []
        reasoning: list[str] = []
        calls: list[ToolCall] = []
        generated: list[int] = []
        first_token_at = None
        finish = "length"
        try:
            for token in tokens:
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                generated.append(token)
                if token in self.tokenizer.eos_token_ids:
                    finish = "stop"
                    break
                events = parser.feed(token)
                ended, events = self._route(events, stops, answer, reasoning, calls)
                yield from events
                if ended:
                    finish = ended
                    break
                if self._cancel.is_set():
                    finish = "cancelled"
                    break
            if finish != "stop_string":
                _, events = self._route(parser.close(), stops, answer, reasoning, calls)
                events += self._route_text(stops.flush(), "answer", answer, reasoning)
                yield from events
        finally:
            tokens.close()
            self._record_cached(prompt + generated)
            # The partial answer is history too: cancelling keeps what was said.
            self._remember("".join(answer), "".join(reasoning), calls)
        self.last_stats = self._stats(start, first_token_at, len(prompt), len(prompt) - reused, len(generated))
        yield Done(finish, self.last_stats, "".join(answer), "".join(reasoning), calls, generated)

    def _tokens(self, new_prompt: list[int], options: SamplingOptions) -> Iterator[int]:
        sampler = make_sampler(options.temperature, options.top_p, options.min_p, top_k=options.top_k)
        self._accepted = 0
        if self.draft_model is not None:

            def count(n: int) -> None:
                self._accepted += n

            return speculative_tokens(
                self.model,
                self.draft_model,
                new_prompt,
                self._cache,
                self._draft_cache,
                sampler,
                options.max_tokens,
                self.num_draft_tokens,
                self.kv_quant,
                self.prefill_step_size,
                on_accept=count,
            )
        processors = make_logits_processors(repetition_penalty=options.repetition_penalty)
        return generate_tokens(
            self.model,
            new_prompt,
            self._cache,
            sampler,
            options.max_tokens,
            processors,
            self.kv_quant,
            self.prefill_step_size,
        )

    def _route(self, events, stops, answer, reasoning, calls) -> tuple[str | None, list[Event]]:
        """Collect events into the turn's record; stop strings apply to the answer channel."""
        out: list[Event] = []
        for event in events:
            if isinstance(event, TextDelta):
                if event.channel == "answer":
                    text, hit = stops.feed(event.text)
                    out += self._route_text(text, "answer", answer, reasoning)
                    if hit:
                        return "stop_string", out
                else:
                    out += self._route_text(event.text, "reasoning", answer, reasoning)
            elif isinstance(event, (ToolCall, ToolCallError)):
                if isinstance(event, ToolCall):
                    calls.append(event)
                out.append(event)
        # A complete tool-call block hands control to the app, which runs the tools.
        if any(isinstance(e, (ToolCall, ToolCallError)) for e in events):
            return "tool_calls", out
        return None, out

    @staticmethod
    def _route_text(text: str, channel: str, answer: list[str], reasoning: list[str]) -> list[Event]:
        if not text:
            return []
        (answer if channel == "answer" else reasoning).append(text)
        return [TextDelta(text, channel)]

    def _remember(self, answer: str, reasoning: str, calls: list[ToolCall]) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": answer}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        self.messages.append(message)

    def _stats(self, start, first_token_at, prompt_tokens, prefilled, generated) -> Stats:
        end = time.perf_counter()
        first = first_token_at or end
        ttft = first - start
        return Stats(
            prompt_tokens=prompt_tokens,
            prefilled_tokens=prefilled,
            generated_tokens=generated,
            time_to_first_token=ttft,
            prompt_tps=prefilled / ttft if ttft > 0 else 0.0,
            generation_tps=(generated - 1) / (end - first) if generated > 1 and end > first else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            draft_accepted=self._accepted if self.draft_model is not None else None,
        )

    # ---- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write messages, settings and the KV cache to one file (atomically), to resume later."""
        path = Path(path)
        meta = {
            "format": "apertus-mlx-chat/1",
            "messages": self.messages,
            "system": self.system,
            "think": self.think,
            "tools": self.tools,
            "options": asdict(self.options),
            "cached": self._cached,
            "model": model_fingerprint(self.model),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_prompt_cache(tmp, self._cache, {"chat": json.dumps(meta, ensure_ascii=False)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def restore(cls, path: str | os.PathLike, model: Any, tokenizer: Any, **kwargs: Any) -> ChatSession:
        """A session saved by `save`. Its KV cache is reused if it was made by this same model."""
        try:
            # mx.load picks the format by file extension; a chat file may be named anything.
            with tempfile.TemporaryDirectory() as tmp:
                link = Path(tmp) / "chat.safetensors"
                os.symlink(Path(path).resolve(), link)
                cache, metadata = load_prompt_cache(str(link), return_metadata=True)
            meta = json.loads(metadata["chat"])
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise ApertusError(f"{path}: not a saved chat ({str(e).splitlines()[0] if str(e) else e!r})") from None
        options = SamplingOptions(**{**meta["options"], "stop": tuple(meta["options"]["stop"])})
        session = cls(model, tokenizer, meta["system"], meta["think"], meta["tools"], options, **kwargs)
        session.messages = meta["messages"]
        same_model = meta["model"] == model_fingerprint(model)
        if same_model and session.max_kv_size is None and session.kv_quant is None and session.draft_model is None:
            session._cache, session._cached = cache, meta["cached"]
        return session


def model_fingerprint(model: Any) -> str:
    """Identifies a model's weights cheaply: its config and a slice of its embedding table."""
    head = np.array(model.model.embed_tokens.weight[:8].astype(mx.float32))
    digest = hashlib.sha256(json.dumps(model.args.extra, sort_keys=True, default=str).encode())
    digest.update(head.tobytes())
    return digest.hexdigest()[:16]


def generate(model: Any, tokenizer: Any, prompt: str, **options: Any) -> str:
    """One-shot: the answer to `prompt` in a fresh chat. `options` are `SamplingOptions` fields."""
    return ChatSession(model, tokenizer, options=SamplingOptions(**options)).generate(prompt)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class _StopMatcher:
    """Holds back answer text that might be the start of a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was completed)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
