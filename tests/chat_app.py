"""Shared by the chat app's tests: an app on the bundled demo model, with its own data folder."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from apertus_mlx.load import DEMO_MODEL
from tui.app import ChatApp
from tui.store import ChatStore
from tui.widgets.message import MessageView
from tui.widgets.prompt import PromptInput

FAST = {"temperature": 0.0, "max_tokens": 24}  # greedy and short: the same text on every run


def stored_chat(home: Path, title: str, messages: list[dict[str, Any]], system: str | None = None) -> int:
    """Put a chat in the app's database before the app starts; returns its id."""
    store = ChatStore(home / "chats.sqlite")
    chat = store.create(title, None, system)
    chat.messages = messages
    store.save(chat)
    store.close()
    return chat.id


def make_app(home: Path, monkeypatch: Any, settings: dict[str, Any] | None = None, **kwargs: Any) -> ChatApp:
    """A `ChatApp` keeping its files in `home`, on the demo model unless `model=` says otherwise."""
    monkeypatch.setenv("APERTUS_CHAT_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if settings:
        store = ChatStore(home / "chats.sqlite")
        store.save_settings(settings)
        store.close()
    kwargs.setdefault("model", str(DEMO_MODEL))
    return ChatApp(**kwargs)


async def wait_for(pilot: Any, condition: Any, timeout: float = 60, step: float = 0.05) -> None:
    """Let the app run until `condition()` holds (AssertionError after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the app"
        await pilot.pause(step)


async def ready(pilot: Any) -> None:
    """Until the model is loaded and a chat is open."""
    app = pilot.app
    prompt = app.chat.query_one(PromptInput)
    await wait_for(pilot, lambda: app.chat.conversation is not None and not prompt.read_only)
    await pilot.pause()


async def send(pilot: Any, text: str) -> None:
    """Type `text`, press Enter, and wait for the answer to end."""
    app = pilot.app
    app.chat.query_one("#prompt").focus()
    await pilot.press(*text)
    answers = app.chat.answers
    await pilot.press("enter")
    await wait_for(pilot, lambda: app.chat.answers > answers)


def submit(app: ChatApp, text: str) -> None:
    """Send `text` as Enter would, without waiting: `pilot.press` waits until the app is idle, which it is
    not while an answer streams in."""
    app.chat.query_one(PromptInput).post_message(PromptInput.Submitted(text))


def views(app: ChatApp, role: str | None = None) -> list[MessageView]:
    return [v for v in app.chat.query(MessageView) if role is None or v.role == role]


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)
