"""One message of the chat: streamed Markdown, deliberation apart and collapsible, tool calls as blocks."""

from __future__ import annotations

import json
from typing import Any

from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Collapsible, Markdown, Static
from textual.widgets._markdown import MarkdownFence, MarkdownStream

ROLE_TITLES = {"user": "You", "assistant": "Apertus", "tool": "Tool result", "error": "Error"}


class ToolCallView(Static):
    """A tool call: the function's name and its arguments, pretty-printed."""

    def __init__(self, name: str, arguments: Any):
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False, indent=2)
        super().__init__(arguments, classes="tool-call", markup=False)
        self.border_title = f"tool call: {name}"
        self.name_, self.arguments = name, arguments


class MessageView(Vertical):
    """A message. Assistant messages grow by `append()` while they stream, without re-rendering what is shown."""

    def __init__(self, role: str, text: str = "", reasoning: str = "", tool_calls: tuple[dict, ...] = ()):
        super().__init__(classes=f"message {role}")
        self.role = role
        self._text, self._reasoning, self._calls = text, reasoning, tool_calls
        self._streams: dict[str, MarkdownStream] = {}
        self.border_title = ROLE_TITLES.get(role, role)

    def compose(self) -> ComposeResult:
        with Collapsible(title="Deliberation", collapsed=False, classes="reasoning") as box:
            box.display = bool(self._reasoning)
            yield Markdown(self._reasoning, classes="reasoning-text")
        yield Markdown(self._text, classes="body")
        for call in self._calls:
            function = call.get("function", call)
            yield ToolCallView(function.get("name", "?"), function.get("arguments", ""))
        footer = Static("", classes="footer", markup=False)
        footer.display = False
        yield footer

    @property
    def text(self) -> str:
        """The answer as shown (Markdown source); before the message is composed, the text it was made with."""
        body = self.query(".body")
        return body.first(Markdown).source if body else self._text

    @property
    def reasoning(self) -> str:
        body = self.query(".reasoning-text")
        return body.first(Markdown).source if body else self._reasoning

    async def append(self, channel: str, text: str) -> None:
        """Add streamed text to the answer or (channel "reasoning") the deliberation."""
        if channel == "reasoning":
            self.query_one(".reasoning", Collapsible).display = True
        stream = self._streams.get(channel)
        if stream is None:
            widget = self.query_one(".reasoning-text" if channel == "reasoning" else ".body", Markdown)
            stream = self._streams[channel] = Markdown.get_stream(widget)
        await stream.write(text)

    async def flush(self) -> None:
        """Wait until everything appended is on screen."""
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            await stream.stop()

    def add_tool_call(self, name: str, arguments: Any) -> None:
        self.mount(ToolCallView(name, arguments), before=self.query_one(".footer"))

    def set_footer(self, text: str) -> None:
        footer = self.query_one(".footer", Static)
        footer.update(text)
        footer.display = bool(text)

    def show_reasoning(self, shown: bool) -> None:
        self.query_one(".reasoning", Collapsible).collapsed = not shown

    def code_blocks(self) -> list[str]:
        """The code of each fenced block of the answer, in order."""
        return [fence.code for fence in self.query_one(".body", Markdown).query(MarkdownFence)]

    def on_click(self, event: events.Click) -> None:
        """A click copies the code block under the pointer, or else the whole message."""
        widget = event.widget
        while widget is not None and widget is not self and not isinstance(widget, MarkdownFence):
            widget = widget.parent
        if isinstance(widget, MarkdownFence):
            self.app.copy_to_clipboard(widget.code)
            self.notify("Code block copied to the clipboard")
        elif self.text:
            self.app.copy_to_clipboard(self.text)
            self.notify("Message copied to the clipboard")
