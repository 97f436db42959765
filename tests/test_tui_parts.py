"""The chat app's parts without a screen: the store, settings, config file, export, progress labels."""

from __future__ import annotations

import json
import sqlite3

import pytest

from apertus_mlx.progress import LoadProgress, hub_tqdm
from tui.catalog import PUBLISHED
from tui.config import DEFAULT_CHAT_MODEL, ConfigFileError, Settings, read_config
from tui.export import chat_markdown, export_path, write_atomically
from tui.store import ChatStore, StoreError


def test_the_default_chat_model_is_a_checked_repository():
    assert DEFAULT_CHAT_MODEL in {p.repo_id for p in PUBLISHED}


def test_store_keeps_chats_in_order_and_deletes_their_caches(tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite")
    a = store.create("a", "m", "sys")
    b = store.create("b", None, None)
    a.messages = [{"role": "user", "content": "Grüezi 🇨🇭"}]
    store.save(a)  # a is now the most recent
    assert [c.title for c in store.chats()] == ["a", "b"]
    store.cache_path(a.id).parent.mkdir(parents=True, exist_ok=True)
    store.cache_path(a.id).write_bytes(b"x")
    store.delete(a.id)
    assert not store.cache_path(a.id).exists()
    assert [c.id for c in store.chats()] == [b.id]
    store.close()
    assert ChatStore(tmp_path / "chats.sqlite").get(b.id).title == "b"


def test_a_store_that_cannot_be_written_says_which_file(tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite")
    chat = store.create("a", None, None)
    reader = sqlite3.connect(tmp_path / "chats.sqlite", timeout=0)
    reader.execute("BEGIN EXCLUSIVE")  # another process holds the database
    store._db.execute("PRAGMA busy_timeout = 0")
    with pytest.raises(StoreError, match=r"chats\.sqlite: cannot write the chat database \(database is locked\)"):
        store.rename(chat.id, "b")
    reader.rollback()
    store.rename(chat.id, "b")  # the failed write left nothing half-done
    assert store.get(chat.id).title == "b"


def test_settings_from_stored_values_ignore_what_they_cannot_use():
    s = Settings.from_stored({"temperature": 1, "top_p": "high", "think": 1, "max_tokens": 300, "nonsense": 3})
    assert (s.temperature, s.top_p, s.think, s.max_tokens) == (1.0, 0.9, False, 300)
    with pytest.raises(ValueError, match=r"^max tokens must be between 1 and 65536, got 0$"):
        Settings(max_tokens=0).check()


def test_config_file_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "tui.toml"
    path.write_text('[keys]\nstop = "f9"\n[export]\ndir = "~/Chats"\n', encoding="utf-8")
    config = read_config(path, {"stop"})
    assert config.keys == {"stop": "f9"} and config.export_dir.name == "Chats"
    path.write_text("[keys\n", encoding="utf-8")
    with pytest.raises(ConfigFileError, match=r"^.*tui\.toml: "):
        read_config(path, {"stop"})
    path.write_text("[keys]\nstop = 3\n", encoding="utf-8")
    with pytest.raises(ConfigFileError, match=r'tui\.toml: keys\.stop: expected a key such as "ctrl\+g"'):
        read_config(path, {"stop"})


def test_export_renders_reasoning_and_tool_calls(tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite")
    chat = store.create("Wetter in Bern?", "apertus", "Be brief.")
    call = {"function": {"name": "weather", "arguments": {"city": "Bern"}}}
    chat.messages = [
        {"role": "user", "content": "Wetter in Bern?"},
        {"role": "assistant", "content": "", "reasoning_content": "Ask the tool.", "tool_calls": [call]},
        {"role": "tool", "content": "21 °C"},
        {"role": "assistant", "content": "21 °C."},
    ]
    text = chat_markdown(chat)
    assert text.startswith("# Wetter in Bern?\n\n*") and "· apertus*" in text
    assert "## System\n\nBe brief.\n" in text
    assert "<details><summary>Deliberation</summary>\n\nAsk the tool.\n\n</details>" in text
    assert '**Tool call** `weather`\n\n```json\n{\n  "city": "Bern"\n}\n```' in text
    assert text.endswith("## Tool\n\n21 °C\n\n## Assistant\n\n21 °C.\n")
    first = write_atomically(export_path(tmp_path, chat), text)
    second = export_path(tmp_path, chat)
    assert (first.name, second.name) == ("wetter-in-bern.md", "wetter-in-bern-2.md")
    assert first.read_text(encoding="utf-8") == text


def test_hub_downloads_report_progress_without_drawing_bars(capsys):
    seen: list[LoadProgress] = []
    bar_class = hub_tqdm(seen.append)
    bar = bar_class(total=2_000, unit="B", desc="Downloading bytes", name="huggingface_hub.x", disable=True)
    bar.update(500)
    bar.total += 1_000  # the hub grows the total as it learns each file's size
    bar.update(1_500)
    bar.close()
    assert [(p.stage, p.done, p.total, p.unit) for p in seen] == [
        ("download", 0, 2000, "B"),
        ("download", 500, 2000, "B"),
        ("download", 2000, 3000, "B"),
    ]
    assert capsys.readouterr().err == ""
    assert json.loads(json.dumps(seen[-1].to_dict()))["type"] == "load_progress"
