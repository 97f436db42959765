"""The sidebar: every chat, the most recent first."""

from __future__ import annotations

from textual.message import Message
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from ..store import ChatRecord


class ChatList(OptionList):
    """Lists chats; choosing one posts `ChatList.Chosen`."""

    BINDINGS = [("r", "rename", "Rename"), ("d", "delete", "Delete")]

    class Chosen(Message):
        def __init__(self, chat_id: int):
            super().__init__()
            self.chat_id = chat_id

    class Rename(Chosen):
        pass

    class Delete(Chosen):
        pass

    def show(self, chats: list[ChatRecord], current: int | None) -> None:
        self.clear_options()
        self.add_options([Option(chat.title, id=str(chat.id)) for chat in chats])
        if current is not None:
            ids = [chat.id for chat in chats]
            if current in ids:
                self.highlighted = ids.index(current)

    def _highlighted_id(self) -> int | None:
        if self.highlighted is None:
            return None
        return int(self.get_option_at_index(self.highlighted).id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.post_message(self.Chosen(int(event.option.id)))

    def action_rename(self) -> None:
        if (chat_id := self._highlighted_id()) is not None:
            self.post_message(self.Rename(chat_id))

    def action_delete(self) -> None:
        if (chat_id := self._highlighted_id()) is not None:
            self.post_message(self.Delete(chat_id))
