"""Small modal dialogs: confirm, ask for a line of text, pick one of several items."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, OptionList
from textual.widgets.option_list import Option


class ConfirmScreen(ModalScreen[bool]):
    """Yes or no; Esc is no."""

    BINDINGS = [("escape", "dismiss(False)", "Cancel"), ("y", "dismiss(True)", "Yes"), ("n", "dismiss(False)", "No")]

    def __init__(self, question: str, yes: str = "Yes"):
        super().__init__(classes="dialog")
        self.question, self.yes = question, yes

    def compose(self) -> ComposeResult:
        yield Footer()
        with Vertical(classes="dialog-box"):
            yield Label(self.question)
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.yes, variant="error", id="yes")
                yield Button("Cancel", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class TextPromptScreen(ModalScreen[str | None]):
    """One line of text (a chat's new name, a file path); Esc cancels."""

    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, question: str, value: str = ""):
        super().__init__(classes="dialog")
        self.question, self.value = question, value

    def compose(self) -> ComposeResult:
        yield Footer()
        with Vertical(classes="dialog-box"):
            yield Label(self.question)
            yield Input(self.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


class ChoiceScreen(ModalScreen[int | None]):
    """Pick one item of a list (e.g. which code block to copy); returns its index."""

    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, question: str, items: list[str]):
        super().__init__(classes="dialog")
        self.question, self.items = question, items

    def compose(self) -> ComposeResult:
        yield Footer()
        with Vertical(classes="dialog-box"):
            yield Label(self.question)
            yield OptionList(*[Option(item, id=str(i)) for i, item in enumerate(self.items)])

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id))
