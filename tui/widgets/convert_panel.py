"""The model picker's convert-to-fit panel: the offer, the Convert and Back buttons, and the conversion's progress.

`ConvertPanel` runs a `ConvertJob` (the `budget` recipe in a child process) and reports through messages:
`Started` when it runs, `Ended` when it failed or was stopped (the panel says why), `Finished(out)` when the
converted model is in `out`, and `Closed` when Back is pressed. Its styles are in `screens/model_picker.tcss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Label, ProgressBar, Static

from .. import catalog
from ..convert_job import ConvertJob
from ..screens.dialogs import ConfirmScreen


@dataclass(frozen=True)
class Conversion:
    """What to convert: `source` (a hub repo id or a local directory) into `out`, to fit `ram_gb` of RAM."""

    name: str  # the model the user picked
    need_bytes: int | None  # what it needs with an 8k-token chat
    source: str
    ram_gb: float
    out: Path


class ConvertPanel(Vertical):
    """Hidden until `offer()`; Convert (or `start()`) runs the conversion, Back posts `Closed`."""

    class Started(Message):
        """The conversion runs: the lists wait until it ends."""

    class Ended(Message):
        """The conversion failed or was stopped; the panel shows why and offers it again."""

    class Finished(Message):
        """The converted model is in `out`."""

        def __init__(self, out: str):
            super().__init__()
            self.out = out

    class Closed(Message):
        """Back was pressed: the lists again."""

    def __init__(self, recipe: str = "budget", extra_args: tuple[str, ...] = (), **kwargs: Any):
        super().__init__(**kwargs)
        self.recipe, self.extra_args = recipe, tuple(extra_args)
        self.conversion: Conversion | None = None  # the one offered
        self.job: ConvertJob | None = None
        self.progress_seen = 0  # progress records shown (tests read it)

    def compose(self) -> ComposeResult:
        yield Static("", id="convert-text")
        with Horizontal(id="convert-buttons"):
            yield Button("Convert to fit [c]", variant="primary", id="convert")
            yield Button("Back [Esc]", id="back")
        yield Label("", id="stage")
        yield ProgressBar(id="convert-progress", show_eta=False)

    def on_mount(self) -> None:
        self.display = False

    @property
    def running(self) -> bool:
        return self.job is not None

    # Offering

    def offer(self, conversion: Conversion) -> None:
        self.conversion = conversion
        fetch = "" if Path(conversion.source).is_dir() else "Download its BF16 weights once and c"
        self.query_one("#convert-text", Static).update(
            f"{conversion.name} needs {catalog.format_size(conversion.need_bytes)} with an 8k chat: too big for "
            f"this machine.\n{fetch or 'C'}onvert them with the budget recipe to fit {conversion.ram_gb:g} GB, "
            f"into {conversion.out}"
        )
        self.display = True
        self.query_one("#convert-buttons").display = True
        self.query_one("#stage", Label).display = False
        self.query_one("#convert-progress", ProgressBar).display = False
        self.query_one("#convert", Button).focus()

    def hide(self) -> None:
        self.conversion = None
        self.display = False

    @on(Button.Pressed, "#convert")
    def _convert_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.start()

    @on(Button.Pressed, "#back")
    def _back_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.post_message(self.Closed())

    # Converting

    def start(self) -> None:
        """Convert what is offered (a conversion already on disk is `Finished` at once)."""
        if self.job is not None or self.conversion is None:
            return
        conversion = self.conversion
        if (conversion.out / "config.json").is_file():
            self.notify(f"Already converted: using {conversion.out}")
            self.post_message(self.Finished(str(conversion.out)))
            return
        self.job = ConvertJob(
            conversion.source, conversion.ram_gb, conversion.out, recipe=self.recipe, extra_args=self.extra_args
        )
        self.query_one("#convert-buttons").display = False
        stage = self.query_one("#stage", Label)
        stage.display = True
        stage.update("Starting the converter…")
        bar = self.query_one("#convert-progress", ProgressBar)
        bar.display = True
        bar.update(total=None, progress=0)
        self.post_message(self.Started())
        self._run(self.job)

    @work(exclusive=True, group="convert")
    async def _run(self, job: ConvertJob) -> None:
        finished: dict[str, Any] | None = None
        try:
            async for record in job.run():  # read to the end, so the child process is reaped here
                if record.get("type") == "progress":
                    self._show_progress(record)
                elif record.get("type") == "done":
                    finished = record
        except Exception as e:  # ConversionError: the converter's own line; else it could not even start
            self._ended(f"Conversion failed: {e}", error=True)
            return
        if job.cancelled:
            self._ended("Conversion stopped; nothing was written.")
        elif finished is None:
            self._ended("The converter ended without a result.", error=True)
        else:
            self.job = None
            self.post_message(self.Finished(str(finished.get("out") or job.out)))

    def _show_progress(self, record: dict[str, Any]) -> None:
        self.progress_seen += 1
        done, total = float(record.get("done") or 0), record.get("total")
        stage, unit = str(record.get("stage", "")), str(record.get("unit", ""))
        if stage == "download":
            if unit == "B":
                amount = f"{catalog.format_size(done)} of {catalog.format_size(total)}" if total else ""
            else:
                amount = f"{done:.0f} of {total:.0f} files" if total else ""
            text = f"Downloading the BF16 weights: {amount}".rstrip(": ")
        else:
            text = f"{stage.capitalize()}: {done:.0f} of {total} {unit}s" if total else stage.capitalize()
        self.query_one("#stage", Label).update(text)
        self.query_one("#convert-progress", ProgressBar).update(total=total or None, progress=done)

    def _ended(self, message: str, error: bool = False) -> None:
        self.job = None
        self.query_one("#stage", Label).update(message)
        self.query_one("#convert-progress", ProgressBar).display = False
        self.query_one("#convert-buttons").display = True
        self.post_message(self.Ended())
        self.notify(message, severity="error" if error else "information")

    # Stopping

    def ask_to_stop(self) -> None:
        """Ask before a running conversion is thrown away; stop it on yes."""
        if self.job is not None:
            question = "Stop the conversion? Nothing of it will be kept."
            self.app.push_screen(ConfirmScreen(question, yes="Stop it"), self._stop_confirmed)

    def _stop_confirmed(self, stop: bool | None) -> None:
        if stop and self.job is not None:
            self.run_worker(self.job.cancel(), group="cancel")
