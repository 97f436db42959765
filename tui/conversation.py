"""A chat being shown: its stored record, its engine session, and the turn rules the app follows.

The record in the database is what survives: it is written after every turn (cancelled or not) and
before any error is shown, so a crash loses at most the turn in progress.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backend import Backend
from .store import ChatRecord, ChatStore

if TYPE_CHECKING:
    from apertus_mlx import ChatSession

TITLE_LENGTH = 40


class Conversation:
    """One chat: stream its turns, regenerate or edit the last one, and keep the record in step."""

    def __init__(self, record: ChatRecord, session: ChatSession, store: ChatStore, backend: Backend):
        self.record, self.session, self.store, self.backend = record, session, store, backend
        self._stop = False

    @property
    def busy(self) -> bool:
        return self.session.busy

    async def turn(self, text: str | None, images: list[Path] | None = None) -> AsyncIterator[Any]:
        """The events of the next answer (to `text`, or to the chat as it stands when None).

        `stop()` ends it at once: the answer kept is exactly what was handed out. The record is saved
        when the turn ends, also when it fails (then without the failed turn).
        """
        self._stop = False
        if text is not None and not self.record.messages and self.record.title.startswith("New chat"):
            self.record.title = _title(text)
        try:
            async with aclosing(self.backend.stream(self.session, text, images)) as events:
                async for event in events:
                    yield event
                    if self._stop:
                        break
        finally:
            self.record.messages = list(self.session.messages)
            self.record.model = self.backend.info.name if self.backend.info else self.record.model
            self.store.save(self.record)

    def stop(self) -> None:
        """End the answer now (also in the middle of reading a long prompt)."""
        self._stop = True
        self.session.cancel()

    def drop_last_answer(self) -> bool:
        """Remove the last answer (and its tool exchanges) so it can be generated again."""
        messages = self.session.messages
        last_user = _last_user(messages)
        if last_user is None or last_user == len(messages) - 1:
            return False
        del messages[last_user + 1 :]
        self._saved()
        return True

    def take_last_user_message(self) -> str | None:
        """Remove the last user message and everything after it; return its text, for editing."""
        messages = self.session.messages
        last_user = _last_user(messages)
        if last_user is None:
            return None
        text = messages[last_user].get("content") or ""
        del messages[last_user:]
        self._saved()
        return text if isinstance(text, str) else str(text)

    def context(self) -> tuple[int, int]:
        """Tokens the chat holds in the KV cache, and the model's context length."""
        info = self.backend.info
        return self.session.cached_tokens, info.context_length if info else 0

    def _saved(self) -> None:
        self.record.messages = list(self.session.messages)
        self.store.save(self.record)


def _last_user(messages: list[dict[str, Any]]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    return None


def _title(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_LENGTH else line[: TITLE_LENGTH - 1] + "…"
