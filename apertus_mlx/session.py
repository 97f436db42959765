"""`ChatSession`: a multi-turn Apertus chat: its conversation, its KV cache, and saving it.

Turns are computed by a `Scheduler`: the engine's, on its thread, or, when the session is used
directly, a private one driven by `stream()` on the calling thread. Either way the same code runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from . import vision
from .chat_format import ChatFormat, image_urls
from .chat_images import ChatImages
from .decode import KVQuantization
from .errors import ApertusError
from .sampling import SamplingOptions
from .scheduler import Scheduler
from .turn import Receipt, Turn, TurnStream

MIN_KV_SIZE = 128  # a rotating cache smaller than this cannot hold a chat's system and developer blocks

__all__ = ["ChatSession", "SamplingOptions", "generate"]


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
        self.options = options or SamplingOptions()
        _check_settings(model, self.options, draft_model, num_draft_tokens, kv_bits, kv_group_size, max_kv_size)
        # The default system text carries today's date: fixed now, so tomorrow the cached chat still matches.
        self.format = ChatFormat(tokenizer)
        self.system = system if system is not None else self.format.default_system()
        self.think, self.tools = think, tools
        self.messages: list[dict[str, Any]] = []
        self.draft_model, self.num_draft_tokens = draft_model, num_draft_tokens
        self.kv_quant = KVQuantization(kv_bits, kv_group_size) if kv_bits else None
        self.max_kv_size = max_kv_size
        self.prefill_step_size = prefill_step_size
        self.last_stats = None
        self._lock = threading.Lock()
        self._turn: Turn | None = None  # the turn in progress, from `stream()` until its history is final
        self.cache: list[Any] = []
        self.draft_cache: list[Any] = []
        self._cached: list[int] = []  # the tokens whose keys and values `cache` holds
        self._draft_cached: list[int] = []
        self.images = ChatImages(self.image_tokenizer)  # the codes of the chat's images, saved with it
        self.reset_cache()

    # ---- conversation -------------------------------------------------------------------------

    def stream(self, user_text: str | None = None, images: list[Any] | None = None, **overrides: Any) -> TurnStream:
        """Add `user_text` (if given) and stream the assistant's reply as events, ending with `Done`.

        The turn is submitted now: bad input raises here. `overrides` replace fields of `options`
        for this turn only (e.g. `temperature=0`). With `user_text=None` the model continues the
        conversation as it stands, e.g. after `add_tool_result`. Closing the iterator early cancels
        the turn and keeps exactly the text received. `images` (paths, bytes, PIL images, `data:` URLs;
        Apertus 1.5) go before the text in the user message, as `image_url` parts with `data:` URLs.
        """

        received: deque[Any] = deque()
        turn = self.new_turn(user_text, overrides, received.append, images=images)
        scheduler = Scheduler(self.model)
        scheduler.submit(turn)
        return TurnStream(Receipt(turn, lambda: scheduler.settle(turn)), _stepping(received, scheduler.step))

    def generate(self, user_text: str, images: list[Any] | None = None, **overrides: Any) -> str:
        """The whole answer to `user_text` (about `images`, if any) as one string."""
        *_, done = self.stream(user_text, images, **overrides)
        return done.answer

    def cancel(self) -> None:
        """Stop the turn in progress after the current token, or before it starts (safe from any thread)."""
        turn = self._turn
        if turn is not None:
            turn.cancelled.set()

    def add_tool_result(self, content: Any, tool_call_id: str | None = None) -> None:
        """Append a tool's result; then call `stream()` to let the model continue."""
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        message: dict[str, Any] = {"role": "tool", "content": text}
        if tool_call_id is not None:
            message["tool_call_id"] = tool_call_id
        self.messages.append(message)

    def render(self, messages: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of the chat, ready for the next answer, by the checkpoint's own chat template.

        Images' ids come from the model's image tokenizer; an image the chat has encoded before is not encoded again.
        """
        messages = self.messages if messages is None else messages
        urls = image_urls(messages)
        images = self.image_tokenizer() if urls else None  # a model without a vision tokenizer refuses here
        text = self.format.render_text(messages, system=self.system, think=self.think, tools=self.tools)
        if images is None:
            return self.tokenizer.encode(text, add_special_tokens=False)
        return images.encode_grids(text, self.images.codes(urls))

    def image_tokenizer(self) -> vision.ImageTokenizer:
        """The model's `vision.ImageTokenizer` (an `ApertusError` naming the model if it cannot read images)."""
        return vision.for_model(self.model, self.tokenizer)

    def user_message(self, text: str | None, images: list[Any] | None = None) -> dict[str, Any] | None:
        """The user message of a turn (None when there is none): `text`, after `images` as `image_url` parts."""
        if not images:
            if text is None:
                return None
            if not text.strip():
                raise ApertusError("empty prompt: nothing to answer")
            return {"role": "user", "content": text}
        self.image_tokenizer()  # refused before any image is read
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": vision.image_url(i)}} for i in images]
        if text:
            parts.append({"type": "text", "text": text})
        return {"role": "user", "content": parts}

    def prepare_images(self, new_messages: list[dict[str, Any]] = ()) -> None:
        """Encode the images of the chat (plus `new_messages`) that it has not encoded yet, and forget those it no
        longer shows. The engine runs this on its MLX thread before a turn that has images."""
        urls = image_urls([*self.messages, *new_messages])
        if urls:
            self.image_tokenizer()
        self.images.codes(urls)
        if not self.busy:  # a turn in progress may use an image not in `messages` yet
            self.images.keep_only(urls)

    def encoded_images(self, new_messages: list[dict[str, Any]] = ()) -> bool:
        """Whether every image of the chat (plus `new_messages`) has its codes already (so no MLX work is due)."""
        return self.images.known(image_urls([*self.messages, *new_messages]))

    def new_turn(
        self,
        user_text: str | dict[str, Any] | None,
        overrides: dict[str, Any],
        sink: Callable[[Any], None],
        images: list[Any] | None = None,
    ) -> Turn:
        """Validate and render the next turn, and mark the chat busy until the turn's history is final.

        `user_text` may also be a message made by `user_message` (then `images` are in it)."""
        options = self._turn_options(overrides)
        message = user_text if isinstance(user_text, dict) else self.user_message(user_text, images)
        new_messages = [message] if message is not None else []
        if not new_messages and not self.messages:
            raise ApertusError("empty prompt: the chat has no messages yet")
        with self._lock:
            if self._turn is not None:
                raise ApertusError("this chat already has a turn in progress; wait for its Done or close its stream")
            prompt = self.render([*self.messages, *new_messages])
            if self.images:  # all encoded by now: only forget the images the chat no longer shows
                self.images.keep_only(image_urls([*self.messages, *new_messages]))
            self._check_context(prompt)
            self._turn = Turn(self, new_messages, options, prompt, self.format.start_channel(prompt), sink)
            return self._turn

    def new_completion(self, text: str, overrides: dict[str, Any], sink: Callable[[Any], None]) -> Turn:
        """A turn that continues `text` as it stands, without the chat template; the history is not changed."""
        options = self._turn_options(overrides)
        if not text:
            raise ApertusError("empty prompt: nothing to complete")
        with self._lock:
            if self._turn is not None:
                raise ApertusError("this chat already has a turn in progress; wait for its Done or close its stream")
            prompt = list(self.tokenizer.encode(text))
            self._check_context(prompt)
            self._turn = Turn(self, [], options, prompt, "answer", sink, raw=True)
            return self._turn

    def _turn_options(self, overrides: dict[str, Any]) -> SamplingOptions:
        options = replace(self.options, **overrides) if overrides else self.options
        _check_draft_options(self.draft_model is not None, options)
        return options

    def release(self, turn: Turn) -> None:
        """Called by `turn` once the chat's history is final."""
        with self._lock:
            if self._turn is turn:
                self._turn = None

    @property
    def busy(self) -> bool:
        """Whether a turn is in progress."""
        return self._turn is not None

    # ---- KV cache -----------------------------------------------------------------------------

    def reset_cache(self) -> None:
        """Forget the KV cache; the next turn re-reads the whole chat."""
        self.cache = self.model.make_cache(max_kv_size=self.max_kv_size)
        self._cached = []
        if self.draft_model is not None:
            self.draft_cache = self.draft_model.make_cache(max_kv_size=self.max_kv_size)
            self._draft_cached = []

    @property
    def cached_tokens(self) -> int:
        """How many tokens of the chat the KV cache holds."""
        return len(self._cached)

    def reuse_prefix(self, prompt: list[int]) -> int:
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

    def record_cached(self, tokens: list[int]) -> None:
        """After a turn, note what each cache holds (decoding may have run one token ahead of what was kept)."""
        for cache, cached in self._caches():
            # Layer by layer: a step that failed part-way may have written to some layers only.
            offset = min(len(tokens), *(c.offset for c in cache))
            for c in cache:
                c.trim(c.offset - offset)
            cached[:] = tokens[:offset]

    def rollback(self, prompt: list[int], reused: int) -> None:
        """After a failed turn: keep only the part of the cache that still holds the chat before it."""
        try:
            self.record_cached(prompt[:reused])
        except Exception:
            self.reset_cache()

    def _caches(self) -> list[tuple[list[Any], list[int]]]:
        pairs = [(self.cache, self._cached)]
        if self.draft_model is not None:
            pairs.append((self.draft_cache, self._draft_cached))
        return pairs

    def _check_context(self, prompt: list[int]) -> None:
        limit = self.model.args.max_position_embeddings
        if self.max_kv_size is None and len(prompt) >= limit:
            raise ApertusError(
                f"the chat is {len(prompt)} tokens, longer than the model's {limit}-token context; "
                "start a new chat or set max_kv_size"
            )

    # ---- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write messages, settings and the KV cache to one file (atomically), to resume later."""
        if self.busy:
            raise ApertusError("this chat has a turn in progress; save it once the turn is done")
        path = Path(path)
        meta = {
            "format": "apertus-mlx-chat/1",
            "messages": self.messages,
            "system": self.system,
            "think": self.think,
            "tools": self.tools,
            "options": asdict(self.options),
            "cached": self._cached,
            "images": self.images.to_json(),
            "model": model_fingerprint(self.model),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_prompt_cache(tmp, self.cache, {"chat": json.dumps(meta, ensure_ascii=False)})
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
            # Read now: arrays still lazy here would belong to this thread's stream, and the engine's
            # thread could not evaluate them.
            mx.eval([c.state for c in cache])
            meta = json.loads(metadata["chat"])
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise ApertusError(f"{path}: not a saved chat ({str(e).splitlines()[0] if str(e) else e!r})") from None
        saved = meta["options"]
        options = SamplingOptions(**{**saved, "stop": tuple(saved["stop"])})
        session = cls(model, tokenizer, meta["system"], meta["think"], meta["tools"], options, **kwargs)
        session.messages = meta["messages"]
        same_model = meta["model"] == model_fingerprint(model)
        if same_model and session.max_kv_size is None and session.kv_quant is None and session.draft_model is None:
            session.cache, session._cached = cache, meta["cached"]
        if same_model:  # codes depend on the vision tokenizer, which comes with the checkpoint
            session.images.load(meta.get("images", {}))
        return session


def _stepping(received: deque[Any], step: Callable[[], None]) -> Callable[[], Any]:
    """The next item a turn hands over, running scheduler steps on this thread until there is one."""

    def next_item() -> Any:
        while not received:
            step()
        return received.popleft()

    return next_item


def check_cache_settings(
    draft: bool, num_draft_tokens: int = 3, kv_bits: int | None = None, max_kv_size: int | None = None
) -> None:
    """Refuse, in one line naming the option, cache settings that cannot work (no model needed)."""
    if num_draft_tokens < 1:
        raise ApertusError(f"num_draft_tokens must be at least 1, got {num_draft_tokens}")
    if draft and max_kv_size is not None:
        raise ApertusError(
            "a draft model cannot be used with max_kv_size: rejected drafts are trimmed from the cache, "
            "which a rotating cache cannot do"
        )
    if kv_bits is not None and kv_bits not in (2, 3, 4, 5, 6, 8):
        raise ApertusError(f"kv_bits must be one of 2, 3, 4, 5, 6, 8, got {kv_bits}")
    if kv_bits is not None and max_kv_size is not None:
        raise ApertusError("kv_bits cannot be combined with max_kv_size: a quantized KV cache cannot rotate")
    if max_kv_size is not None and max_kv_size < MIN_KV_SIZE:
        raise ApertusError(f"max_kv_size must be at least {MIN_KV_SIZE} tokens to hold a chat, got {max_kv_size}")


def _check_settings(model, options, draft_model, num_draft_tokens, kv_bits, kv_group_size, max_kv_size) -> None:
    """`check_cache_settings`, and what depends on the model and the sampling options."""
    check_cache_settings(draft_model is not None, num_draft_tokens, kv_bits, max_kv_size)
    _check_draft_options(draft_model is not None, options)
    if kv_bits is not None and model.args.head_dim % kv_group_size:
        raise ApertusError(f"kv_group_size {kv_group_size} does not divide the head dimension {model.args.head_dim}")


def _check_draft_options(draft: bool, options: SamplingOptions) -> None:
    if draft and (options.repetition_penalty or options.logprobs is not None):
        raise ApertusError("repetition_penalty and logprobs are not supported with a draft model")
    if draft and options.grammar is not None:
        raise ApertusError("response_format is not supported with a draft model (speculative decoding)")


def model_fingerprint(model: Any) -> str:
    """Identifies a model's weights cheaply: its config and a slice of its embedding table."""
    head = np.array(model.model.embed_tokens.weight[:8].astype(mx.float32))
    digest = hashlib.sha256(json.dumps(model.args.extra, sort_keys=True, default=str).encode())
    digest.update(head.tobytes())
    return digest.hexdigest()[:16]


def generate(model: Any, tokenizer: Any, prompt: str, images: list[Any] | None = None, **options: Any) -> str:
    """One-shot: the answer to `prompt` (about `images`: paths, bytes or PIL images) in a fresh chat.
    `options` are `SamplingOptions` fields."""
    return ChatSession(model, tokenizer, options=SamplingOptions(**options)).generate(prompt, images)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
