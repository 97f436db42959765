"""What the chat screen does with answers: stream them in, stop, retry, edit, copy, export."""

from __future__ import annotations

from pathlib import Path

from textual import work
from textual.containers import VerticalScroll

from ..export import chat_markdown, export_path, write_atomically
from ..widgets.message import MessageView
from ..widgets.progress_panel import ProgressPanel
from ..widgets.prompt import PromptInput
from ..widgets.status import StatusLine
from .dialogs import ChoiceScreen, TextPromptScreen

SHOW_READING_FROM = 512  # prompts shorter than this are read too fast for a bar to help


class TurnDisplay:
    """Mixed into `ChatScreen`: runs a turn as a worker and shows its events as they come."""

    @property
    def answering(self) -> bool:
        """Whether an answer is being streamed in (until it is fully on screen)."""
        return any(w.group == "turn" and not w.is_finished for w in self.app.workers)

    def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        if self.conversation is None or self.busy():
            return
        self.query_one(PromptInput).clear()
        images, self.attachments = self.attachments, []
        self._show_attachments()
        self.run_turn(event.text.strip(), images)

    @work(group="dialog", exit_on_error=False)
    async def action_attach_image(self) -> None:
        """Attach an image file to the next message (Apertus 1.5 reads images); an empty answer detaches all."""
        answer = await self.app.push_screen_wait(
            TextPromptScreen("Attach an image to your next message (a file path; empty: detach all)")
        )
        if not answer:
            self.attachments = []
        else:
            path = Path(answer).expanduser()
            if not path.is_file():
                self.notify(f"no such file: {path}", severity="error")
                return
            self.attachments.append(path)
        self._show_attachments()

    def _show_attachments(self) -> None:
        note = self.query_one("#attachments")
        note.update("  ".join(f"📎 {p.name}" for p in self.attachments) + " (sent with your next message)")
        note.display = bool(self.attachments)

    @work(exclusive=True, group="turn", exit_on_error=False)
    async def run_turn(self, text: str | None, images: list[Path] | None = None) -> None:
        """Stream the next answer into a new message; `text=None` answers the chat as it stands."""
        conversation = self.conversation
        log = self.query_one("#messages", VerticalScroll)
        progress = self.query_one(ProgressPanel)
        shown = text if not images else "\n\n".join([text or "", *(f"🖼 *image: {p.name}*" for p in images)])
        user = MessageView("user", shown) if text is not None else None
        view = MessageView("assistant")
        await log.mount_all([v for v in (user, view) if v is not None])
        view.show_reasoning(self.show_reasoning)
        log.anchor()
        done = None
        try:
            async for event in conversation.turn(text, images):
                kind = type(event).__name__
                if kind == "PrefillProgress" and event.total >= SHOW_READING_FROM and event.done < event.total:
                    label = f"Reading the prompt: {event.done:,}/{event.total:,} tokens (Esc stops)"
                    progress.show(label, event.done, event.total)
                elif kind == "TextDelta":
                    progress.hide()
                    await view.append(event.channel, event.text)
                elif kind == "ToolCall":
                    view.add_tool_call(event.name, event.raw_arguments or event.arguments)
                elif kind == "ToolCallError":
                    view.add_tool_call("(malformed)", f"{event.message}\n{event.raw}")
                elif kind == "Done":
                    done = event
        except Exception as e:  # the chat was saved without this turn; its text and images go back
            await view.flush()
            self.attachments = list(images or []) + self.attachments
            self._show_attachments()
            await self._failed(e, text, [v for v in (user, view) if v is not None])
            return
        finally:
            progress.hide()
        await view.flush()
        self._finished(view, done)

    def _finished(self, view: MessageView, done) -> None:
        self.answers += 1
        if done is None:
            view.set_footer("stopped")
        else:
            s = done.stats
            reason = {"stop": "", "length": " · cut at max tokens", "cancelled": " · stopped"}.get(
                done.finish_reason, f" · {done.finish_reason}"
            )
            view.set_footer(f"{s.generated_tokens} tokens · {s.generation_tps:.1f} tok/s{reason}")
            self.query_one(StatusLine).set_stats(s)
            self.last_stats = s
        self.update_context()
        self.refresh_chats()  # the first answer names the chat

    async def _failed(self, error: Exception, text: str | None, views: list[MessageView]) -> None:
        self.answers += 1
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        for v in views:
            await v.remove()
        await self.query_one("#messages", VerticalScroll).mount(MessageView("error", message))
        prompt = self.query_one(PromptInput)
        if text and not prompt.text:
            prompt.text = text
        self.notify(message, title="The answer failed", severity="error", timeout=10)

    # ---- actions ----------------------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.conversation is not None and self.conversation.busy:
            self.conversation.stop()

    async def action_retry(self) -> None:
        if self.conversation is None or self.busy():
            return
        if not self.conversation.drop_last_answer():
            self.notify("There is no answer to regenerate yet.")
            return
        await self.show_messages(self.conversation.record.messages)
        self.run_turn(None)

    async def action_edit_last(self) -> None:
        if self.conversation is None or self.busy():
            return
        text = self.conversation.take_last_user_message()
        if text is None:
            self.notify("There is no message to edit yet.")
            return
        await self.show_messages(self.conversation.record.messages)
        prompt = self.query_one(PromptInput)
        prompt.text = text
        prompt.focus()

    def action_toggle_reasoning(self) -> None:
        self.show_reasoning = not self.show_reasoning
        for view in self.query(MessageView):
            view.show_reasoning(self.show_reasoning)

    def _last_answer(self) -> MessageView | None:
        answers = [v for v in self.query(MessageView) if v.role == "assistant" and v.text]
        return answers[-1] if answers else None

    def action_copy_answer(self) -> None:
        view = self._last_answer()
        if view is None:
            self.notify("There is no answer to copy yet.")
            return
        self.app.copy_to_clipboard(view.text)
        self.notify("Answer copied to the clipboard")

    @work(group="dialog", exit_on_error=False)
    async def action_copy_code(self) -> None:
        blocks = [code for v in self.query(MessageView) if v.role == "assistant" for code in v.code_blocks()]
        if not blocks:
            self.notify("There is no code block to copy yet.")
            return
        choice = len(blocks) - 1
        if len(blocks) > 1:
            labels = [f"{i + 1}. {(b.strip().splitlines() or [''])[0][:60]}" for i, b in enumerate(blocks)]
            choice = await self.app.push_screen_wait(ChoiceScreen("Copy which code block?", labels))
            if choice is None:
                return
        self.app.copy_to_clipboard(blocks[choice])
        self.notify("Code block copied to the clipboard")

    @work(group="dialog", exit_on_error=False)
    async def action_export(self) -> None:
        if self.conversation is None:
            return
        record = self.conversation.record
        default = export_path(self.app.user_config.export_dir or Path.cwd(), record)
        answer = await self.app.push_screen_wait(TextPromptScreen("Export this chat as Markdown to", str(default)))
        if not answer:
            return
        try:
            path = write_atomically(Path(answer).expanduser(), chat_markdown(record))
        except OSError as e:
            self.notify(f"cannot write {answer}: {e.strerror or e}", severity="error")
            return
        self.notify(f"Exported to {path}")
