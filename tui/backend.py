"""The app's one door to the engine: load a model, open chats, stream turns, keep KV caches on disk.

Everything here is plain `apertus_mlx` API; the MLX work itself runs on the engine's own thread.
The runtime is imported on first use, so the window is up before MLX and the tokenizer are.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DEFAULT_CHAT_MODEL, Settings
from .store import ChatRecord, ChatStore

if TYPE_CHECKING:
    from apertus_mlx import ChatSession, Engine
    from apertus_mlx.model_info import ModelInfo
    from apertus_mlx.progress import LoadProgress


class Backend:
    """One loaded model (an `Engine`) and the chat being shown on it."""

    def __init__(self, store: ChatStore):
        self.store = store
        self.engine: Engine | None = None
        self.note: str | None = None  # e.g. that the bundled demo model stands in for the default
        self.import_summary: list[str] = []  # what importing a published format (GGUF, GPTQ, NVFP4) did

    @property
    def info(self) -> ModelInfo | None:
        return self.engine.info if self.engine is not None else None

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.model is not None

    async def load(self, model: str | None, progress: Callable[[LoadProgress], None]) -> None:
        """Load `model` (None: the default) in the background, replacing the current one.

        `progress` is called on the engine thread. Raises the runtime's one-line error on failure.
        """
        await self.close()
        engine = await asyncio.to_thread(_start_engine, model or None, progress)
        self.engine = engine
        await asyncio.to_thread(engine.wait_ready)
        self.note = engine.note
        self.import_summary = engine.import_summary

    async def close(self) -> None:
        """Stop the current engine (its running turn ends as cancelled)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            await asyncio.to_thread(engine.close)

    # ---- chats --------------------------------------------------------------------------------------

    async def open(self, record: ChatRecord, settings: Settings) -> ChatSession:
        """A session for a stored chat: its saved KV cache when it was made by this model, else none
        (the first turn then re-reads the history)."""
        engine = self._engine()
        cache_file = self.store.cache_path(record.id)
        session = None
        if cache_file.is_file():
            try:
                session = await asyncio.to_thread(engine.restore, cache_file)
            except Exception:  # unreadable or from another version: the history is enough
                cache_file.unlink(missing_ok=True)
        if session is None:
            session = engine.session(system=record.system or None)
        session.messages = list(record.messages)  # the database is the record; the cache only speeds up
        apply_settings(session, settings)
        return session

    def new_session(self, settings: Settings) -> ChatSession:
        session = self._engine().session(system=settings.system_prompt or None)
        apply_settings(session, settings)
        return session

    async def save_cache(self, record: ChatRecord, session: ChatSession) -> None:
        """Keep the chat's KV cache for the next run; written atomically, skipped for an empty chat."""
        if self.engine is None or not session.messages or session.busy:
            return
        await asyncio.to_thread(self.engine.save, session, self.store.cache_path(record.id))

    def stream(self, session: ChatSession, text: str | None, images: list[Path] | None = None) -> AsyncIterator[Any]:
        """The next turn's events (see `Engine.astream`); `text=None` answers the chat as it stands.

        `images` go with the user's message (Apertus 1.5); a model that cannot read them refuses in one line.
        """
        if images:
            return self._engine().astream(session, text, images=[str(p) for p in images])
        return self._engine().astream(session, text)

    def _engine(self) -> Engine:
        if self.engine is None or self.engine.model is None:
            raise RuntimeError("no model is loaded yet")
        return self.engine


def apply_settings(session: ChatSession, settings: Settings) -> None:
    """The settings that may change between turns of one chat: deliberation and sampling."""
    from apertus_mlx import SamplingOptions

    session.think = settings.think
    session.options = SamplingOptions(
        max_tokens=settings.max_tokens, temperature=settings.temperature, top_p=settings.top_p
    )


def _start_engine(model: str | None, progress: Callable[[LoadProgress], None]) -> Engine:
    from apertus_mlx import Engine

    return Engine(model, progress=progress, default=DEFAULT_CHAT_MODEL)
