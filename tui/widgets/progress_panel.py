"""A bar with a line of text: loading the model, downloading it, or reading a long prompt."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar


class ProgressPanel(Horizontal):
    """Hidden until `show()`; `total=None` draws an indeterminate bar."""

    def compose(self) -> ComposeResult:
        yield Label("", id="progress-label")
        yield ProgressBar(show_eta=False, id="progress-bar")

    def on_mount(self) -> None:
        self.display = False

    def show(self, label: str, done: float, total: float | None) -> None:
        self.display = True
        self.query_one(Label).update(label)
        self.query_one(ProgressBar).update(total=total, progress=done)

    def hide(self) -> None:
        self.display = False
