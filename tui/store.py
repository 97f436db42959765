"""Chats and settings in one SQLite file; each chat's KV cache in a file beside it.

SQLite makes every write atomic, so a crash or a full disk never leaves half a chat. Messages are kept
in the engine's OpenAI-like shape (`ChatSession.messages`), reasoning and tool calls included.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    model TEXT,
    system TEXT,
    messages TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class ChatRecord:
    """One conversation as stored: its messages, the system prompt it was begun with, the model it last used."""

    id: int
    title: str
    created: float
    updated: float
    model: str | None = None
    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)


class StoreError(Exception):
    """The chat database cannot be opened or written; the message names the file."""


class ChatStore:
    """The app's database: `chats` and `settings`. Safe to call from the app's threads."""

    def __init__(self, path: Path):
        self.path = path
        self.cache_dir = path.parent / "caches"
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False)
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise StoreError(f"{path}: cannot open the chat database ({e})") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- chats --------------------------------------------------------------------------------------

    def chats(self) -> list[ChatRecord]:
        """Every chat, the most recently used first."""
        rows = self._query("SELECT * FROM chats ORDER BY updated DESC, id DESC")
        return [_record(row) for row in rows]

    def get(self, chat_id: int) -> ChatRecord | None:
        rows = self._query("SELECT * FROM chats WHERE id = ?", (chat_id,))
        return _record(rows[0]) if rows else None

    def create(self, title: str, model: str | None, system: str | None) -> ChatRecord:
        now = time.time()
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO chats (title, created, updated, model, system) VALUES (?, ?, ?, ?, ?)",
                (title, now, now, model, system),
            )
        return ChatRecord(int(cursor.lastrowid), title, now, now, model, system)

    def save(self, record: ChatRecord) -> None:
        """Write the chat's title, model and messages, and mark it as just used."""
        record.updated = time.time()
        with self._write() as db:
            db.execute(
                "UPDATE chats SET title = ?, updated = ?, model = ?, system = ?, messages = ? WHERE id = ?",
                (
                    record.title,
                    record.updated,
                    record.model,
                    record.system,
                    json.dumps(record.messages, ensure_ascii=False),
                    record.id,
                ),
            )

    def rename(self, chat_id: int, title: str) -> None:
        with self._write() as db:
            db.execute("UPDATE chats SET title = ? WHERE id = ?", (title, chat_id))

    def delete(self, chat_id: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM chats WHERE id = ?", (chat_id,))
        self.cache_path(chat_id).unlink(missing_ok=True)

    def cache_path(self, chat_id: int) -> Path:
        """Where the chat's KV cache is kept between runs (written atomically by the engine)."""
        return self.cache_dir / f"chat-{chat_id}.safetensors"

    # ---- settings -----------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return {key: json.loads(value) for key, value in self._query("SELECT key, value FROM settings")}

    def save_settings(self, values: dict[str, Any]) -> None:
        with self._write() as db:
            db.executemany(
                "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
                [(k, json.dumps(v, ensure_ascii=False)) for k, v in values.items()],
            )

    # ---- plumbing -----------------------------------------------------------------------------------

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"{self.path}: cannot read the chat database ({e})") from None

    def _write(self) -> _Transaction:
        return _Transaction(self)


class _Transaction:
    """One atomic write under the store's lock; a failure rolls back and raises `StoreError`."""

    def __init__(self, store: ChatStore):
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        return self.store._db

    def __exit__(self, kind: Any, error: Any, trace: Any) -> bool:
        try:
            if error is None:
                try:
                    self.store._db.commit()
                    return False
                except sqlite3.Error as e:
                    error = e
            self.store._db.rollback()
            if isinstance(error, sqlite3.Error):
                raise StoreError(f"{self.store.path}: cannot write the chat database ({error})") from None
            return False
        finally:
            self.store._lock.release()


def _record(row: tuple[Any, ...]) -> ChatRecord:
    chat_id, title, created, updated, model, system, messages = row
    return ChatRecord(chat_id, title, created, updated, model, system, json.loads(messages))
