"""The model picker in the whole app (Textual pilot on the bundled demo model): Ctrl+O, pick, and chat on it."""

from __future__ import annotations

import shutil

from textual.widgets import DataTable

from apertus_mlx.load import DEMO_MODEL
from tui.screens.chat import ChatScreen
from tui.screens.model_picker import ModelPickerScreen
from tui.widgets.status import StatusLine

from chat_app import FAST, make_app, ready, run, send, views, wait_for


def on_this_mac(tmp_path, monkeypatch):
    """The app's data folder with one conversion in it (a copy of the demo model), and an empty hub cache."""
    home = tmp_path / "home"
    copy = shutil.copytree(DEMO_MODEL, home / "models" / "demo-copy")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    (tmp_path / "empty-hub").mkdir()
    return home, copy


async def open_picker(pilot) -> ModelPickerScreen:
    await pilot.press("ctrl+o")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ModelPickerScreen))
    await pilot.pause()
    return pilot.app.screen


def status(app) -> str:
    return str(app.chat.query_one(StatusLine).render())


def test_escape_in_the_picker_changes_nothing(tmp_path, monkeypatch):
    home, _ = on_this_mac(tmp_path, monkeypatch)
    app = make_app(home, monkeypatch, FAST)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            engine, conversation, shown = app.backend.engine, app.chat.conversation, status(app)
            picker = await open_picker(pilot)
            assert picker.query_one("#local", DataTable).row_count == 1
            await pilot.press("escape")
            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen))
            await pilot.pause()
            assert app.backend.engine is engine and app.chat.conversation is conversation
            assert status(app) == shown and app.settings.model == str(DEMO_MODEL)

    run(main())
    app = make_app(home, monkeypatch, model=None)  # no --model: the remembered one
    assert app.settings.model == str(DEMO_MODEL)
    app.store.close()


def test_a_model_picked_on_this_mac_is_loaded_answers_and_is_remembered(tmp_path, monkeypatch):
    home, copy = on_this_mac(tmp_path, monkeypatch)
    app = make_app(home, monkeypatch, FAST)

    async def pick():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            assert app.backend.info.demo and "demo-copy" not in status(app)
            picker = await open_picker(pilot)
            local = picker.query_one("#local", DataTable)
            assert local.row_count == 1 and picker.focused is local  # only the copy: the hub cache is empty
            assert picker.local[0].path == copy and picker.local[0].origin == "converted"
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.backend.info is not None and app.backend.info.path == copy)
            await ready(pilot)
            assert status(app).startswith("demo-copy · ")
            assert app.settings.model == str(copy)
            await pilot.press("ctrl+n")
            await send(pilot, "Hello")
            answer = views(app, "assistant")[-1].text
            assert answer.strip()
            return app.chat.conversation.record

    record = run(pick())
    assert record.messages[-1]["role"] == "assistant" and record.messages[0]["content"] == "Hello"

    restarted = make_app(home, monkeypatch, model=None)  # no --model: the remembered one

    async def reopen():
        async with restarted.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            return restarted.settings.model, restarted.backend.info.path, status(restarted)

    model, path, shown = run(reopen())
    assert model == str(copy) and path == copy and shown.startswith("demo-copy · ")
