"""The main screen: chats in a sidebar, the conversation, the message box and the status line."""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static

from ..conversation import Conversation
from ..store import ChatRecord
from ..widgets.chat_list import ChatList
from ..widgets.message import MessageView
from ..widgets.progress_panel import ProgressPanel
from ..widgets.prompt import PromptInput
from ..widgets.status import StatusLine
from .turns import TurnDisplay

# (id, keys, action, footer text, shown in the footer). The ids are what the config file's [keys] names.
KEYS = [
    ("stop", "escape", "stop", "Stop", True),
    ("new_chat", "ctrl+n", "new_chat", "New chat", True),
    ("retry", "ctrl+r", "retry", "Retry", True),
    ("edit_last", "ctrl+e", "edit_last", "Edit last", False),
    ("toggle_reasoning", "ctrl+t", "toggle_reasoning", "Reasoning", True),
    ("copy_answer", "ctrl+y", "copy_answer", "Copy", True),
    ("copy_code", "ctrl+k", "copy_code", "Copy code", False),
    ("attach_image", "f3", "attach_image", "Attach image", False),
    ("export", "ctrl+x", "export", "Export", False),
    ("settings", "ctrl+s", "app.settings", "Settings", True),
    ("pick_model", "ctrl+o", "app.pick_model", "Model", True),
    ("rename_chat", "f2", "rename_chat", "Rename", False),
    ("delete_chat", "f8", "delete_chat", "Delete", False),
    ("toggle_sidebar", "ctrl+b", "toggle_sidebar", "Chats", False),
    ("help", "f1", "app.help", "Help", True),
]


class ChatScreen(TurnDisplay, Screen):
    """Shows one conversation at a time; the app owns the model, the store and the settings."""

    BINDINGS = [Binding(k, a, d, show=s, priority=True, id=i) for i, k, a, d, s in KEYS]

    class Ready(Message):
        """The model is loaded and a chat is open."""

    def __init__(self):
        super().__init__()
        self.conversation: Conversation | None = None
        self.show_reasoning = True
        self.last_stats = None  # the last answer's `Stats`
        self.answers = 0  # answers ended (finished, stopped or failed) since the screen opened
        self.attachments: list[Path] = []  # images for the next message

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            yield ChatList(id="sidebar")
            with Vertical(id="chat"):
                yield VerticalScroll(id="messages")
                yield ProgressPanel(id="progress")
                yield Static("", id="attachments", markup=False)
                yield PromptInput(id="prompt", placeholder="Loading the model…")
        yield StatusLine(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(PromptInput).read_only = True
        self.query_one("#attachments").display = False
        self.refresh_chats()

    # ---- chats ----------------------------------------------------------------------------------------

    def refresh_chats(self) -> None:
        current = self.conversation.record.id if self.conversation else None
        self.query_one(ChatList).show(self.app.store.chats(), current)

    async def open_chat(self, record: ChatRecord | None) -> None:
        """Show `record` (None: a new chat), keeping the KV cache of the one we leave for next time."""
        await self.leave_chat()
        app = self.app
        if record is None:
            session = app.backend.new_session(app.settings)
            record = app.store.create("New chat", app.backend.info.name, session.system)
        else:
            session = await app.backend.open(record, app.settings)
        await self.show_messages(record.messages)
        self.conversation = Conversation(record, session, app.store, app.backend)
        self.refresh_chats()
        self.update_context()

    async def leave_chat(self) -> None:
        """Save the KV cache of the chat being left (its messages are saved after every turn)."""
        conversation, self.conversation = self.conversation, None
        if conversation is not None:
            with suppress(Exception):  # losing a cache only costs re-reading the chat next time
                await self.app.backend.save_cache(conversation.record, conversation.session)

    async def show_messages(self, messages: list[dict]) -> None:
        log = self.query_one("#messages", VerticalScroll)
        await log.remove_children()
        views = [
            MessageView(m["role"], _text(m.get("content")), m.get("reasoning_content") or "", m.get("tool_calls") or ())
            for m in messages
            if m.get("role") in ("user", "assistant", "tool")
        ]
        await log.mount_all(views)
        for view in views:
            view.show_reasoning(self.show_reasoning)
        log.scroll_end(animate=False)

    async def show_error(self, message: str) -> None:
        """An error as a message in the chat (e.g. the model could not be loaded)."""
        await self.query_one("#messages", VerticalScroll).mount(MessageView("error", message))

    def update_context(self) -> None:
        if self.conversation is not None:
            self.query_one(StatusLine).set_context(*self.conversation.context())

    def enable_input(self, enabled: bool, placeholder: str = "Message Apertus (Enter sends, Shift+Enter: new line)"):
        prompt = self.query_one(PromptInput)
        prompt.read_only = not enabled
        prompt.placeholder = placeholder
        if enabled:
            prompt.focus()

    def busy(self) -> bool:
        if self.conversation is not None and self.conversation.busy:
            self.notify("An answer is being written; Esc stops it first.", severity="warning")
            return True
        return False

    # ---- sidebar ----------------------------------------------------------------------------------------

    @work(exclusive=True, group="chat", exit_on_error=False)
    async def on_chat_list_chosen(self, event: ChatList.Chosen) -> None:
        if isinstance(event, (ChatList.Rename, ChatList.Delete)):
            await (self.rename_chat if isinstance(event, ChatList.Rename) else self.delete_chat)(event.chat_id)
            return
        if self.busy() or not self.app.backend.ready:
            return
        if self.conversation is None or event.chat_id != self.conversation.record.id:
            await self.open_chat(self.app.store.get(event.chat_id))
        self.query_one(PromptInput).focus()

    @work(exclusive=True, group="chat", exit_on_error=False)
    async def action_new_chat(self) -> None:
        if not self.busy() and self.app.backend.ready:
            await self.open_chat(None)
            self.query_one(PromptInput).focus()

    @work(group="dialog", exit_on_error=False)
    async def action_rename_chat(self) -> None:
        if self.conversation is not None:
            await self.rename_chat(self.conversation.record.id)

    @work(group="dialog", exit_on_error=False)
    async def action_delete_chat(self) -> None:
        if self.conversation is not None:
            await self.delete_chat(self.conversation.record.id)

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one(ChatList)
        sidebar.display = not sidebar.display

    async def rename_chat(self, chat_id: int) -> None:
        record = self.app.store.get(chat_id)
        title = await self.app.push_screen_wait(_rename_screen(record.title))
        if title:
            self.app.store.rename(chat_id, title)
            if self.conversation and self.conversation.record.id == chat_id:
                self.conversation.record.title = title
            self.refresh_chats()

    async def delete_chat(self, chat_id: int) -> None:
        from .dialogs import ConfirmScreen

        record = self.app.store.get(chat_id)
        if not await self.app.push_screen_wait(ConfirmScreen(f"Delete the chat “{record.title}”?", yes="Delete")):
            return
        if self.conversation and self.conversation.record.id == chat_id:
            if self.busy():
                return
            self.conversation = None
            self.app.store.delete(chat_id)
            chats = self.app.store.chats()
            await self.open_chat(chats[0] if chats else None)
        else:
            self.app.store.delete(chat_id)
        self.refresh_chats()


def _rename_screen(title: str):
    from .dialogs import TextPromptScreen

    return TextPromptScreen("New name for this chat", title)


def _text(content) -> str:
    """A message's content as shown: text parts as they are, each image as a note of its own."""
    if content is None or isinstance(content, str):
        return content or ""
    shown = []
    for part in content:
        if part.get("type") == "text":
            shown.append(part.get("text", ""))
        elif part.get("type") == "image_url":
            url = str((part.get("image_url") or {}).get("url", ""))
            shown.append(f"🖼 *image: {'attached' if url.startswith('data:') else Path(url).name}*")
    return "\n\n".join(shown)
