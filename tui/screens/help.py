"""The help screen: every key binding as it is now (after the config file), and where that file is."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Markdown


class HelpScreen(ModalScreen[None]):
    """Key bindings and files; any of Esc, F1 or q closes it."""

    BINDINGS = [("escape,f1,q", "dismiss", "Close")]

    def __init__(self, bindings: list[tuple[str, str, str]], config_file: str, data_dir: str):
        super().__init__(classes="dialog")
        self.bindings, self.config_file, self.data_dir = bindings, config_file, data_dir

    def compose(self) -> ComposeResult:
        yield Footer()
        rows = "\n".join(f"| `{keys}` | {text} | `{action}` |" for action, keys, text in self.bindings)
        text = (
            "# Keys\n\n| key | does | action id |\n|---|---|---|\n"
            f"{rows}\n| `enter` / `shift+enter`, `ctrl+j` | send / new line | |\n\n"
            f'Change a key in `{self.config_file}`:\n\n```toml\n[keys]\ncopy_answer = "ctrl+y,f6"\n```\n\n'
            f"Chats and their KV caches are kept in `{self.data_dir}`. Click a message to copy it, "
            "or a code block to copy just the code."
        )
        with VerticalScroll(classes="dialog-box help"):
            yield Markdown(text)
