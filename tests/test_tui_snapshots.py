"""The chat app's screens as pictures (pytest-textual-snapshot), at 80x24 and 120x40.

A change in how the app looks fails here until the new pictures are accepted with
`pytest tests/test_tui_snapshots.py --snapshot-update` (then look at them in the report).
"""

from __future__ import annotations

import pytest

from tui.store import ChatStore

from chat_app import make_app, ready

ANSWER = """Zürich is the largest city; the capital is **Bern**.

```python
cities = {"Bern": 134_000, "Zürich": 421_000}
print(max(cities, key=cities.get))
```

- Geneva hosts many international organisations.
- Lugano is in Ticino."""


def _app(tmp_path, monkeypatch):
    store = ChatStore(tmp_path / "chats.sqlite")
    for title in ("Hiking in Graubünden", "Recipe: Rösti"):
        store.create(title, None, None)
    chat = store.create("Swiss cities", None, "You are a helpful assistant.")
    chat.messages = [
        {"role": "user", "content": "Which Swiss city is the capital?"},
        {"role": "assistant", "content": ANSWER, "reasoning_content": "The federal city is Bern, not Zürich."},
    ]
    store.save(chat)
    store.close()
    return make_app(tmp_path, monkeypatch)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_chat_screen(snap_compare, tmp_path, monkeypatch, size):
    assert snap_compare(_app(tmp_path, monkeypatch), terminal_size=size, run_before=ready)


def test_help_screen(snap_compare, tmp_path, monkeypatch):
    async def run_before(pilot):
        await ready(pilot)
        await pilot.press("f1")

    assert snap_compare(_app(tmp_path, monkeypatch), terminal_size=(80, 24), run_before=run_before)


def test_settings_screen(snap_compare, tmp_path, monkeypatch):
    async def run_before(pilot):
        await ready(pilot)
        await pilot.press("ctrl+s")

    assert snap_compare(_app(tmp_path, monkeypatch), terminal_size=(80, 24), run_before=run_before)
