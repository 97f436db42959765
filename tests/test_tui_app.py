"""The chat app driven by Textual's pilot on the bundled demo model: what a user does, and what they see."""

from __future__ import annotations

import json
from pathlib import Path

from apertus_mlx import TurnError
from tui.store import ChatStore
from tui.widgets.message import MessageView, ToolCallView
from tui.widgets.progress_panel import ProgressPanel
from tui.widgets.prompt import PromptInput

from chat_app import FAST, make_app, ready, run, send, stored_chat, submit, views, wait_for


def test_an_answer_streams_in_pieces_and_is_saved(tmp_path, monkeypatch):
    app = make_app(tmp_path, monkeypatch, {**FAST, "max_tokens": 80})

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            submit(app, "Hello there")
            lengths = []
            while not app.chat.answers:
                answer = views(app, "assistant")
                lengths.append(len(answer[-1].text) if answer else 0)
                await pilot.pause(0.02)
            return lengths, views(app, "assistant")[-1].text, app.chat.conversation.record

    lengths, shown, record = run(main())
    grown = sorted(set(lengths) - {0})
    assert len(grown) >= 3, f"the answer arrived in {len(grown)} pieces"
    assert record.messages[-1] == {"role": "assistant", "content": shown}
    assert record.messages[0] == {"role": "user", "content": "Hello there"}
    assert record.title == "Hello there"
    stored = ChatStore(tmp_path / "chats.sqlite").get(record.id)
    assert stored.messages == record.messages


def test_escape_stops_and_keeps_exactly_what_was_shown(tmp_path, monkeypatch):
    app = make_app(tmp_path, monkeypatch, {"temperature": 0.0, "max_tokens": 2000})

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            submit(app, "Hi")
            await wait_for(pilot, lambda: views(app, "assistant") and len(views(app, "assistant")[-1].text) > 20)
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.chat.answers, timeout=5)
            view = views(app, "assistant")[-1]
            return view.text, view.query_one(".footer").render(), app.chat.conversation.record

    shown, footer, record = run(main())
    assert "stopped" in str(footer)
    assert 20 < len(shown) < 2000 * 4
    assert record.messages[-1] == {"role": "assistant", "content": shown}


def test_reasoning_is_apart_and_one_key_toggles_it(tmp_path, monkeypatch):
    stored_chat(
        tmp_path,
        "Thinking",
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
        ],
    )
    app = make_app(tmp_path, monkeypatch)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            view = views(app, "assistant")[-1]
            box = view.query_one(".reasoning")
            states = [(view.reasoning, view.text, box.display, box.collapsed)]
            await pilot.press("ctrl+t")
            states.append(box.collapsed)
            await pilot.press("ctrl+t")
            states.append(box.collapsed)
            return states

    (reasoning, answer, shown, collapsed), hidden, again = run(main())
    assert (reasoning, answer) == ("Two and two make four.", "4")
    assert shown and not collapsed and hidden and not again


def test_streamed_reasoning_goes_to_its_own_block(tmp_path, monkeypatch):
    app = make_app(tmp_path, monkeypatch)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            view = MessageView("assistant")
            await app.chat.query_one("#messages").mount(view)
            for channel, text in [("reasoning", "Let me "), ("reasoning", "think."), ("answer", "```py\nx = 1")]:
                await view.append(channel, text)
            await view.flush()
            return view.reasoning, view.text, view.code_blocks()

    assert run(main()) == ("Let me think.", "```py\nx = 1", ["x = 1"])  # the open fence is already a code block


def test_switching_chats_shows_each_ones_messages(tmp_path, monkeypatch):
    app = make_app(tmp_path, monkeypatch, FAST)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "first chat")
            first = app.chat.conversation.record.id
            await pilot.press("ctrl+n")
            await wait_for(pilot, lambda: app.chat.conversation.record.id != first)
            assert views(app) == []
            await send(pilot, "second chat")
            sidebar = app.chat.query_one("#sidebar")
            titles = [sidebar.get_option_at_index(i).prompt for i in range(sidebar.option_count)]
            sidebar.focus()
            sidebar.highlighted = titles.index("first chat")
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.chat.conversation.record.id == first)
            await pilot.pause(0.1)
            return titles, [v.text for v in views(app, "user")]

    titles, shown = run(main())
    assert titles == ["second chat", "first chat"]
    assert shown == ["first chat"]


def test_a_restarted_app_resumes_the_chat_from_its_saved_cache(tmp_path, monkeypatch):
    async def first_run():
        app = make_app(tmp_path, monkeypatch, FAST)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "Remember me")
            record = app.chat.conversation.record
            await app.action_quit()
            return record

    async def second_run():
        app = make_app(tmp_path, monkeypatch)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            shown = [v.text for v in views(app, "user")]
            await send(pilot, "Again")
            return app.chat.conversation.record.id, shown, app.chat.last_stats

    record = run(first_run())
    assert ChatStore(tmp_path / "chats.sqlite").cache_path(record.id).is_file()
    chat_id, shown, stats = run(second_run())
    assert (chat_id, shown) == (record.id, ["Remember me"])
    # Only the new message (and the template's few tokens around it) is read; the rest comes from the cache.
    assert stats.prefilled_tokens < 20 < stats.prompt_tokens


def test_a_chat_whose_cache_is_unreadable_rereads_its_history(tmp_path, monkeypatch):
    store = ChatStore(tmp_path / "chats.sqlite")
    chat = store.create("Old", None, None)
    chat.messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    store.save(chat)
    store.cache_path(chat.id).parent.mkdir(parents=True)
    store.cache_path(chat.id).write_bytes(b"not a cache")
    store.close()
    app = make_app(tmp_path, monkeypatch, FAST)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "More")
            return app.chat.last_stats, app.chat.conversation.record.messages

    stats, messages = run(main())
    assert stats.prefilled_tokens == stats.prompt_tokens
    assert [m["content"] for m in messages[:3]] == ["Hi", "Hello!", "More"]


def test_settings_are_remembered_across_restarts(tmp_path, monkeypatch):
    async def change():
        app = make_app(tmp_path, monkeypatch)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: app.screen.query("#temperature"))
            field = app.screen.query_one("#temperature")
            field.value = "0.3"
            app.screen.query_one("#max_tokens").value = "77"
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: app.settings.temperature == 0.3)
            return app.chat.conversation.session.options

    async def reopen():
        app = make_app(tmp_path, monkeypatch)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            return app.settings, app.chat.conversation.session.options

    options = run(change())
    assert (options.temperature, options.max_tokens) == (0.3, 77)
    settings, options = run(reopen())
    assert (settings.temperature, settings.max_tokens) == (0.3, 77)
    assert (options.temperature, options.max_tokens) == (0.3, 77)


def test_a_bad_setting_is_refused_in_the_dialog(tmp_path, monkeypatch):
    app = make_app(tmp_path, monkeypatch)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: app.screen.query("#top_p"))
            app.screen.query_one("#top_p").value = "7"
            await pilot.press("ctrl+s")
            await pilot.pause(0.1)
            return str(app.screen.query_one("#settings-error").render()), app.settings.top_p

    error, top_p = run(main())
    assert error == "error: top-p must be in (0, 1], got 7.0"
    assert top_p == 0.9


def test_copy_the_answer_and_a_code_block(tmp_path, monkeypatch):
    answer = "Two ways:\n\n```sh\nls -l\n```\n\n```py\nprint(1)\n```"
    stored_chat(tmp_path, "Code", [{"role": "user", "content": "list files"}, {"role": "assistant", "content": answer}])
    app = make_app(tmp_path, monkeypatch)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await pilot.press("ctrl+y")
            copied = [app.clipboard]
            await pilot.press("ctrl+k")
            await wait_for(pilot, lambda: app.screen.query("OptionList"))
            await pilot.press("down", "enter")
            await wait_for(pilot, lambda: app.clipboard != answer)
            copied.append(app.clipboard)
            return copied

    assert run(main()) == [answer, "print(1)"]


def test_export_writes_the_chat_as_markdown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = make_app(tmp_path / "home", monkeypatch, FAST)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "Export me")
            await pilot.press("ctrl+x")
            await wait_for(pilot, lambda: app.screen.query("Input"))
            await pilot.press("enter")
            await wait_for(pilot, lambda: (tmp_path / "export-me.md").exists())
            return views(app, "assistant")[-1].text

    answer = run(main())
    text = (tmp_path / "export-me.md").read_text(encoding="utf-8")
    assert text.startswith("# Export me\n")
    assert "## User\n\nExport me\n\n## Assistant\n\n" + answer.strip() in text


def test_a_missing_model_is_a_message_in_the_app(tmp_path, monkeypatch):
    app = make_app(tmp_path, monkeypatch, model=str(tmp_path / "no-such-model"))

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: views(app, "error"))
            return views(app, "error")[0].text, app.chat.query_one(PromptInput).read_only

    message, read_only = run(main())
    assert message == f"model path {tmp_path / 'no-such-model'} does not exist"
    assert read_only


def test_a_failure_mid_answer_is_shown_and_nothing_is_lost(tmp_path, monkeypatch):
    app = make_app(tmp_path, monkeypatch, FAST)

    async def failing(session, text, images=None):
        yield type("TextDelta", (), {"channel": "answer", "text": "Half an ans"})()
        raise TurnError("out of memory: [metal::malloc] cannot allocate 4 GB")

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "First")
            monkeypatch.setattr(app.backend, "stream", failing)
            await pilot.press(*"Second", "enter")
            await wait_for(pilot, lambda: views(app, "error"))
            return (
                views(app, "error")[0].text,
                app.chat.query_one(PromptInput).text,
                [v.text for v in views(app, "user")],
                app.chat.conversation.record.id,
            )

    error, prompt, users, chat_id = run(main())
    assert error == "out of memory: [metal::malloc] cannot allocate 4 GB"
    assert prompt == "Second"  # the message is back in the box, to send again
    assert users == ["First"]
    stored = ChatStore(tmp_path / "chats.sqlite").get(chat_id)
    assert [m["content"] for m in stored.messages if m["role"] == "user"] == ["First"]


def test_key_bindings_come_from_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "tui.toml").write_text('[keys]\ncopy_answer = "f6"\n', encoding="utf-8")
    stored_chat(tmp_path, "Keys", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "the answer"}])
    app = make_app(tmp_path, monkeypatch)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await pilot.press("ctrl+y")
            before = app.clipboard
            await pilot.press("f6")
            return before, app.clipboard

    assert run(main()) == ("", "the answer")


def test_a_bad_config_file_is_reported_and_defaults_are_kept(tmp_path, monkeypatch):
    (tmp_path / "tui.toml").write_text('[keys]\ncopy_everything = "f6"\n', encoding="utf-8")
    app = make_app(tmp_path, monkeypatch)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            return [n.message for n in app._notifications]

    notes = run(main())
    assert any(n.startswith(f"{tmp_path / 'tui.toml'}: keys.copy_everything: unknown action") for n in notes)


def test_retry_and_edit_the_last_message(tmp_path, monkeypatch):
    app = make_app(tmp_path, monkeypatch, {"temperature": 1.0, "max_tokens": 12})

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "Tell me")
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: app.chat.answers == 2)
            after_retry = json.loads(json.dumps(app.chat.conversation.record.messages))
            await pilot.press("ctrl+e")
            await wait_for(pilot, lambda: app.chat.query_one(PromptInput).text == "Tell me")
            return after_retry, app.chat.conversation.record.messages, [v.role for v in views(app)]

    after_retry, after_edit, shown = run(main())
    assert [m["role"] for m in after_retry] == ["user", "assistant"]
    assert after_edit == [] and shown == []


LONG_PASTE = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(400))


def test_a_long_paste_shows_reading_progress_and_esc_cancels_it(tmp_path, monkeypatch):
    app = make_app(tmp_path, monkeypatch, FAST)
    shown = []
    original = ProgressPanel.show

    def record(panel, label, done, total):
        shown.append((label, done, total))
        original(panel, label, done, total)

    monkeypatch.setattr(ProgressPanel, "show", record)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            shown.clear()
            submit(app, LONG_PASTE)
            await wait_for(pilot, lambda: shown)
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.chat.answers)
            view = views(app, "assistant")[-1]
            return view.text, str(view.query_one(".footer").render()), app.chat.conversation.record.messages

    answer, footer, messages = run(main())
    label, done, total = shown[0]
    assert label == f"Reading the prompt: {done:,}/{total:,} tokens (Esc stops)"
    assert 0 < done < total > 2000
    assert (answer, footer) == ("", "stopped")
    assert messages == [{"role": "user", "content": LONG_PASTE}, {"role": "assistant", "content": ""}]


def test_rename_and_delete_a_chat_from_the_sidebar(tmp_path, monkeypatch):
    store = ChatStore(tmp_path / "chats.sqlite")
    for title in ("Keep", "Drop"):
        store.create(title, None, None)
    store.close()
    app = make_app(tmp_path, monkeypatch)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            assert app.chat.conversation.record.title == "Drop"  # the most recent opens
            await pilot.press("f2")
            await wait_for(pilot, lambda: app.screen.query("Input"))
            app.screen.query_one("Input").value = "Dropped soon"
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.chat.conversation.record.title == "Dropped soon")
            await pilot.press("f8")
            await wait_for(pilot, lambda: app.screen.query("#yes"))
            await pilot.press("escape")  # not deleted
            await pilot.press("f8")
            await wait_for(pilot, lambda: app.screen.query("#yes"))
            await pilot.click("#yes")
            await wait_for(pilot, lambda: app.chat.conversation.record.title == "Keep")
            return [c.title for c in app.store.chats()]

    assert run(main()) == ["Keep"]


def test_tool_calls_and_results_are_blocks_of_their_own(tmp_path, monkeypatch):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Bern"}'}}
    stored_chat(
        tmp_path,
        "Weather",
        [
            {"role": "user", "content": "Weather in Bern?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": "call_1"},
            {"role": "assistant", "content": "It is 21 °C."},
        ],
    )
    app = make_app(tmp_path, monkeypatch)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            blocks = app.chat.query(ToolCallView)
            return [(b.border_title, b.arguments) for b in blocks], [(v.role, v.text) for v in views(app)]

    blocks, shown = run(main())
    assert blocks == [("tool call: get_weather", '{"city": "Bern"}')]
    assert shown[2] == ("tool", '{"temperature": 21}')
    assert shown[3] == ("assistant", "It is 21 °C.")


def test_a_theme_chosen_anywhere_is_remembered(tmp_path, monkeypatch):
    async def choose():
        app = make_app(tmp_path, monkeypatch)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            app.theme = "textual-light"  # as the command palette's theme picker does
            await pilot.pause()
            await app.action_quit()

    async def reopen():
        app = make_app(tmp_path, monkeypatch)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            return app.theme

    run(choose())
    assert run(reopen()) == "textual-light"


def test_download_and_load_progress_are_shown(tmp_path, monkeypatch):
    from apertus_mlx.progress import LoadProgress
    from tui.app import LoadUpdate

    app = make_app(tmp_path, monkeypatch)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            labels = []
            for progress in (
                LoadProgress("download", 1.5e9, 4.5e9, "B", "Downloading bytes"),
                LoadProgress("download", 3, 9, "it", "Fetching 9 files"),
                LoadProgress("load", 0, 1, description="loading Apertus-8B"),
            ):
                app.post_message(LoadUpdate(progress))
                await pilot.pause()
                labels.append(str(app.chat.query_one("#progress-label").render()))
            return labels

    assert run(main()) == ["Downloading: 1.50/4.50 GB", "Downloading: Fetching 9 files", "Loading Apertus-8B…"]


def test_an_unexpected_failure_is_a_notice_not_a_crash(tmp_path, monkeypatch):
    store = ChatStore(tmp_path / "chats.sqlite")
    store.create("Old", None, None)
    store.close()
    app = make_app(tmp_path, monkeypatch)

    async def broken_open(record, settings):
        raise OSError("disk I/O error")

    monkeypatch.setattr(app.backend, "open", broken_open)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: any(n.title == "Something went wrong" for n in app._notifications))
            return [n.message for n in app._notifications if n.title == "Something went wrong"], app.is_running

    messages, running = run(main())
    assert messages == ["disk I/O error"] and running


def test_fast_streaming_appends_without_rerendering_what_is_shown(tmp_path, monkeypatch):
    from textual.widgets import Markdown
    from textual.widgets._markdown import MarkdownBlock

    app = make_app(tmp_path, monkeypatch)
    document = "First paragraph, already complete.\n\n" + "```python\n" + "x = 1\n" * 40 + "```\n\nLast words."
    appends = []
    original = Markdown.append

    def counting(markdown, fragment):
        appends.append(fragment)
        return original(markdown, fragment)

    monkeypatch.setattr(Markdown, "append", counting)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            view = MessageView("assistant")
            await app.chat.query_one("#messages").mount(view)
            body = view.query_one(".body", Markdown)
            first = None
            for i in range(0, len(document), 2):  # ~150 two-character tokens, as fast as they come
                await view.append("answer", document[i : i + 2])
                if first is None and "\n\n```" in document[: i + 2]:
                    await pilot.pause(0.05)
                    first = body.query(MarkdownBlock).first()
            await view.flush()
            blocks = list(body.query(MarkdownBlock))
            return first, blocks, view.text, view.code_blocks()

    first, blocks, text, code = run(main())
    assert text == document
    assert code == [("x = 1\n" * 40).rstrip()]
    assert blocks[0] is first  # the finished paragraph was never rebuilt
    assert len(appends) < len(document) // 2 / 3  # fragments are batched while the screen catches up


def test_an_attached_image_is_noted_and_kept_when_the_model_cannot_read_it(tmp_path, monkeypatch):
    from PIL import Image

    picture = tmp_path / "matterhorn.png"
    Image.new("RGB", (40, 24), (200, 30, 30)).save(picture)
    app = make_app(tmp_path / "home", monkeypatch, FAST)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await pilot.press("f3")
            await wait_for(pilot, lambda: app.screen.query("Input"))
            app.screen.query_one("Input").value = str(picture)
            await pilot.press("enter")
            note = app.chat.query_one("#attachments")
            await wait_for(pilot, lambda: note.display)
            noted = str(note.render())
            submit(app, "What mountain is this?")
            await wait_for(pilot, lambda: views(app, "error"))
            error = views(app, "error")[0].text
            return noted, error, app.chat.attachments, app.chat.query_one(PromptInput).text

    noted, error, attachments, prompt = run(main())
    assert noted == "📎 matterhorn.png (sent with your next message)"
    assert "cannot read images" in error  # the demo model (Apertus 1) has no vision tokenizer, and says so
    assert attachments == [picture] and prompt == "What mountain is this?"  # nothing is lost


def test_an_attached_image_goes_to_an_apertus_1p5_model_with_the_message(tmp_path, monkeypatch):
    from test_vision_chat import picture, save_chat_checkpoint

    _, checkpoint, _ = save_chat_checkpoint(tmp_path / "ckpt")
    image = tmp_path / "bern.png"
    picture(40, 40, seed=5).save(image)
    app = make_app(tmp_path / "home", monkeypatch, FAST, model=str(checkpoint))

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            app.chat.attachments = [image]
            await send(pilot, "Where is this?")
            return [v.text for v in views(app, "user")], app.chat.conversation.record.messages, app.chat.last_stats

    shown, messages, stats = run(main())
    assert shown == ["Where is this?\n\n🖼 *image: bern.png*"]
    parts = messages[0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"] and parts[1]["text"] == "Where is this?"
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert messages[1]["role"] == "assistant" and stats.prompt_tokens > 20  # the image's codes were read


def test_a_published_format_opens_with_its_import_summary_and_chats(tmp_path, monkeypatch):
    gguf = Path(__file__).resolve().parent / "fixtures" / "demo-bf16.gguf"
    app = make_app(tmp_path, monkeypatch, model=str(gguf))

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            notes = [(n.title, n.message) for n in app._notifications]
            await send(pilot, "Hallo")
            return notes, [v.text for v in views(app)]

    notes, texts = run(main())
    summary = [message for title, message in notes if title == "Imported as published"]
    assert len(summary) == 1 and summary[0].startswith("GGUF BF16: ")
    assert texts[0] == "Hallo" and texts[1].strip()  # the GGUF's own tokenizer and template answered
