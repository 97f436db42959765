"""`ChatApp`: the terminal chat app. It owns the store, the settings and the model; screens do the rest."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from textual import work
from textual.app import App
from textual.message import Message
from textual.worker import Worker, WorkerState

from .backend import Backend, apply_settings
from .config import ConfigFileError, Settings, UserConfig, config_file, data_dir, read_config
from .screens.chat import KEYS, ChatScreen
from .screens.help import HelpScreen
from .screens.settings import SettingsScreen
from .store import ChatStore
from .widgets.progress_panel import ProgressPanel
from .widgets.status import StatusLine


class LoadUpdate(Message):
    """Progress of downloading or loading the model, posted from the engine's thread."""

    def __init__(self, progress):
        super().__init__()
        self.progress = progress


class ChatApp(App):
    """A private Apertus chat in the terminal."""

    CSS_PATH = "app.tcss"
    TITLE = "Apertus"

    def __init__(self, model: str | None = None, system_prompt: str | None = None, think: bool | None = None):
        super().__init__()
        self.store = ChatStore(data_dir() / "chats.sqlite")
        settings = Settings.from_stored(self.store.settings())
        given = {"model": model, "system_prompt": system_prompt, "think": think}
        self.settings = replace(settings, **{k: v for k, v in given.items() if v is not None})
        self.store.save_settings(self.settings.to_stored())
        self.backend = Backend(self.store)
        self.config_error: str | None = None
        try:
            self.user_config = read_config(config_file(), {k[0] for k in KEYS})
        except ConfigFileError as e:
            self.user_config, self.config_error = UserConfig(keys={}), str(e)

    async def on_mount(self) -> None:
        if self.settings.theme in self.available_themes:
            self.theme = self.settings.theme
        self.set_keymap(self.user_config.keys)
        self.theme_changed_signal.subscribe(self, self._remember_theme)
        await self.push_screen(ChatScreen())
        if self.config_error:
            self.notify(f"{self.config_error}; using the default keys", severity="error", timeout=15)
        self.load_model(self.settings.model or None)

    @property
    def chat(self) -> ChatScreen:
        return next(s for s in self.screen_stack if isinstance(s, ChatScreen))

    # ---- the model ----------------------------------------------------------------------------------

    @work(exclusive=True, group="load", exit_on_error=False)
    async def load_model(self, model: str | None) -> None:
        """Load `model` in the background (None: the default), then open the most recent chat."""
        chat = self.chat
        await chat.leave_chat()
        chat.enable_input(False, "Loading the model…")
        chat.query_one(ProgressPanel).show(f"Loading {model or 'the default model'}…", 0, None)
        try:
            await self.backend.load(model, lambda p: self.post_message(LoadUpdate(p)))
        except Exception as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            chat.query_one(ProgressPanel).hide()
            chat.enable_input(False, "No model: Ctrl+O picks one")
            self.notify(message, title="The model could not be loaded", severity="error", timeout=20)
            await chat.show_error(message)
            return
        info = self.backend.info
        name = "demo model (not a real assistant)" if info.demo else info.name
        chat.query_one(StatusLine).set_model(name, info.quantization, info.weights_bytes)
        chat.query_one(ProgressPanel).hide()
        if self.backend.note:
            note = self.backend.note.removeprefix("note: ")
            self.notify(f"{note} Here, Ctrl+O picks a model.", title="Demo model", timeout=15)
        if self.backend.import_summary:
            self.notify("\n".join(self.backend.import_summary), title="Imported as published", timeout=15)
        chats = self.store.chats()
        await chat.open_chat(chats[0] if chats else None)
        chat.enable_input(True)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """A task that failed unexpectedly is a message in the app, never a traceback on a dead terminal."""
        if event.state == WorkerState.ERROR:
            error = event.worker.error
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            self.notify(message, title="Something went wrong", severity="error", timeout=15)

    def on_load_update(self, message: LoadUpdate) -> None:
        p = message.progress
        if p.stage == "download" and p.unit == "B" and p.total:
            label = f"Downloading: {p.done / 1e9:.2f}/{p.total / 1e9:.2f} GB"
        elif p.stage == "download":
            label = f"Downloading: {p.description}"
        else:
            label = p.description[:1].upper() + p.description[1:] + "…"
        self.chat.query_one(ProgressPanel).show(label, p.done, p.total)

    @work(group="dialog", exit_on_error=False)
    async def action_pick_model(self) -> None:
        from .screens.model_picker import ModelPickerScreen

        if self.chat.busy():
            return
        current = str(self.backend.info.path) if self.backend.info else None
        choice = await self.push_screen_wait(ModelPickerScreen(current))
        if choice:
            self.settings = replace(self.settings, model=choice)
            self.store.save_settings(self.settings.to_stored())
            self.load_model(choice)

    # ---- settings, help, quit -----------------------------------------------------------------------

    @work(group="dialog", exit_on_error=False)
    async def action_settings(self) -> None:
        settings = await self.push_screen_wait(SettingsScreen(self.settings, sorted(self.available_themes)))
        if settings is None:
            return
        self.settings = settings
        self.store.save_settings(settings.to_stored())
        self.theme = settings.theme  # (saved again by _remember_theme: same values)
        if self.chat.conversation is not None:
            apply_settings(self.chat.conversation.session, settings)
        self.notify("Settings saved")

    def _remember_theme(self, theme) -> None:
        if theme.name != self.settings.theme:
            self.settings = replace(self.settings, theme=theme.name)
            self.store.save_settings(self.settings.to_stored())

    def action_help(self) -> None:
        keys = {b.id: b.key for b in self.chat.BINDINGS}
        keys.update(self.user_config.keys)
        rows = [(i, keys[i], text) for i, _, _, text, _ in KEYS]
        self.push_screen(HelpScreen(rows, str(config_file()), str(Path(self.store.path).parent)))

    async def action_quit(self) -> None:
        """Keep the open chat's KV cache, stop the engine, then leave."""
        if self.chat.conversation is not None:
            self.chat.conversation.stop()
        await self.chat.leave_chat()
        await self.backend.close()
        self.store.close()
        self.exit()
