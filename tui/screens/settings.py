"""The settings screen: system prompt, deliberation, sampling, theme. Saved when accepted."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Select, Switch, TextArea

from ..config import Settings


class SettingsScreen(ModalScreen[Settings | None]):
    """Edit `Settings`; Ctrl+S or "Save" returns the new ones, Esc discards."""

    BINDINGS = [("escape", "dismiss(None)", "Cancel"), ("ctrl+s", "save", "Save")]

    def __init__(self, settings: Settings, themes: list[str]):
        super().__init__(classes="dialog")
        self.settings, self.themes = settings, themes

    def compose(self) -> ComposeResult:
        yield Footer()
        s = self.settings
        with VerticalScroll(classes="dialog-box settings"):
            model = Path(s.model).name if s.model and Path(s.model).is_dir() else s.model or "the default"
            yield Label(f"Model: {model} (Ctrl+O in the chat chooses another)")
            yield Label("System prompt (empty: the model's own, with today's date; applies to new chats)")
            yield TextArea(s.system_prompt, id="system_prompt", soft_wrap=True)
            with Horizontal(classes="setting"):
                yield Label("Deliberation (reasoning before answering)")
                yield Switch(s.think, id="think")
            for name, label in (("temperature", "Temperature"), ("top_p", "Top-p"), ("max_tokens", "Max tokens")):
                with Horizontal(classes="setting"):
                    yield Label(label)
                    yield Input(str(getattr(s, name)), id=name)
            with Horizontal(classes="setting"):
                yield Label("Theme")
                yield Select([(t, t) for t in self.themes], value=s.theme, allow_blank=False, id="theme")
            yield Label("", id="settings-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.dismiss(None)

    def action_save(self) -> None:
        try:
            settings = replace(
                self.settings,
                system_prompt=self.query_one("#system_prompt", TextArea).text.strip(),
                think=self.query_one("#think", Switch).value,
                temperature=float(self.query_one("#temperature", Input).value),
                top_p=float(self.query_one("#top_p", Input).value),
                max_tokens=int(self.query_one("#max_tokens", Input).value),
                theme=str(self.query_one("#theme", Select).value),
            )
            settings.check()
        except ValueError as e:
            self.query_one("#settings-error", Label).update(f"error: {str(e).splitlines()[0]}")
            return
        self.dismiss(settings)
