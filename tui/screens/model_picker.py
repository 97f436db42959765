"""The model picker: models on this Mac, the published Apertus repositories, and converting one to fit.

`ModelPickerScreen` dismisses with a local model directory (str), a hub repo id to download (str), or None.
A model too big for this machine's RAM is offered the project's own answer: download its BF16 weights once
and convert them with the `budget` recipe to this RAM, in a child process (`tui.convert_job`), then use it.
The screen decides what can be converted and into where; `widgets.convert_panel.ConvertPanel` offers it,
runs it and shows its progress.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Label, Static

from .. import catalog
from ..catalog import LocalModel, PublishedModel
from ..widgets.convert_panel import Conversion, ConvertPanel

Entry = LocalModel | PublishedModel


class ModelPickerScreen(ModalScreen[str | None]):
    """Pick a model: Enter on a local one returns its path, on a published one its repo id.

    A published model that does not fit this machine's RAM is offered a `budget` conversion to fit; when it
    succeeds, the screen returns the new directory. Esc closes (or, while converting, asks to stop).
    `published`, `recipe` and `convert_args` exist for tests and experiments; the app leaves them be.
    """

    CSS_PATH = "model_picker.tcss"
    BINDINGS = [
        Binding("enter", "choose", "Choose", show=True, priority=False),
        Binding("c", "convert", "Convert to fit"),
        Binding("tab", "switch_table", "Other list", show=True),
        Binding("r", "refresh", "Rescan"),
        Binding("escape", "close", "Close"),
    ]

    def __init__(
        self,
        current: str | None = None,
        models_dir: Path | None = None,
        ram_bytes: int | None = None,
        *,
        published: Sequence[PublishedModel] | None = None,
        recipe: str = "budget",
        convert_args: Sequence[str] = (),
    ):
        super().__init__()
        self.current = current
        self.models_dir = Path(models_dir) if models_dir else catalog.default_models_dir()
        self.ram_bytes = ram_bytes if ram_bytes is not None else catalog.total_ram_bytes()
        self.published = tuple(catalog.PUBLISHED if published is None else published)
        self.recipe = recipe
        self.convert_args = tuple(convert_args)
        self.local: list[LocalModel] = []

    # Layout

    def compose(self) -> ComposeResult:
        with Vertical(id="picker"):
            yield Label(self._ram_line(), id="ram-line")
            yield Label("On this Mac", classes="section")
            yield DataTable(id="local", cursor_type="row", zebra_stripes=True)
            yield Label("Published", classes="section")
            yield DataTable(id="published", cursor_type="row", zebra_stripes=True)
            yield Static("", id="detail")
            yield ConvertPanel(self.recipe, self.convert_args, id="convert-panel")
        yield Footer()

    @property
    def panel(self) -> ConvertPanel:
        return self.query_one(ConvertPanel)

    def on_mount(self) -> None:
        local = self.query_one("#local", DataTable)
        local.add_columns("", "model", "quant", "size", "fits", "where")
        published = self.query_one("#published", DataTable)
        published.add_columns("repository", "params", "quant", "size", "fits", "kind")
        for i, model in enumerate(self.published):
            fits = model.fits(self.ram_bytes)
            published.add_row(
                model.repo_id,
                model.parameters_label,
                model.quantization,
                catalog.format_size(model.size_bytes, model.size_estimated),
                catalog.fit_label(fits),
                model.family,
                key=f"pub:{i}",
            )
        self._hide_convert_panel()
        self.action_refresh()
        (local if self.local else published).focus()

    def action_refresh(self) -> None:
        if self.panel.running:
            return
        self.local = catalog.local_models(self.models_dir)
        table = self.query_one("#local", DataTable)
        table.clear()
        for i, model in enumerate(self.local):
            mark = "●" if self.current and self.current in (str(model.path), model.name) else ""
            table.add_row(
                mark,
                model.name,
                model.quantization,
                catalog.format_size(model.size_bytes),
                catalog.fit_label(model.fits(self.ram_bytes)) if model.error is None else "broken",
                model.origin,
                key=f"local:{i}",
            )
        if not self.local:
            self.query_one("#detail", Static).update("No Apertus model on this Mac yet: pick a published one.")
        else:
            self._show_detail(self._highlighted())

    def _ram_line(self) -> str:
        if self.ram_bytes is None:
            return "This machine's memory is unknown, so fits cannot be judged."
        return (
            f"This machine: {catalog.format_size(self.ram_bytes)} of memory. A model fits when its weights and "
            f"an 8k-token chat take at most {catalog.format_size(self.ram_bytes * catalog.USABLE_RAM)}."
        )

    # What is highlighted

    def _table_entry(self, table: DataTable) -> Entry | None:
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value or ""
        kind, _, index = key.partition(":")
        return (self.local if kind == "local" else self.published)[int(index)]

    def _highlighted(self) -> Entry | None:
        focused = self.focused if isinstance(self.focused, DataTable) else self.query_one("#local", DataTable)
        return self._table_entry(focused)

    @on(DataTable.RowHighlighted)
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if not self.panel.running:
            self._hide_convert_panel()
            self._show_detail(self._table_entry(event.data_table))

    def _show_detail(self, entry: Entry | None) -> None:
        detail = self.query_one("#detail", Static)
        if isinstance(entry, LocalModel):
            text = f"{entry.path}" + (f"\nbroken: {entry.error}" if entry.error else "")
            if entry.info is not None:
                text += f"\nneeds {catalog.format_size(entry.info.memory_bytes())} with an 8k-token chat"
        elif isinstance(entry, PublishedModel):
            text = f"id from {entry.source}\n({entry.evidence})"
        else:
            text = ""
        detail.update(text)

    # Choosing

    @on(DataTable.RowSelected)
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_choose()

    def action_choose(self) -> None:
        if self.panel.running:
            return
        if self.panel.conversion is not None:
            self.action_convert()
            return
        entry = self._highlighted()
        if isinstance(entry, LocalModel):
            if entry.error is None:
                self.dismiss(str(entry.path))
            else:
                self.notify(f"{entry.name} cannot be used: {entry.error}", severity="error")
        elif isinstance(entry, PublishedModel):
            if entry.fits(self.ram_bytes) is False:
                self._offer_conversion(entry)
            else:
                self.dismiss(entry.repo_id)

    def action_switch_table(self) -> None:
        if self.panel.running:
            return
        local, published = self.query_one("#local", DataTable), self.query_one("#published", DataTable)
        (published if self.focused is local else local).focus()

    # Converting

    def _conversion_source(self, entry: Entry) -> tuple[str, str] | None:
        """(what to pass as --model, a name for the output) for an entry, or None when none can be made."""
        if isinstance(entry, LocalModel):
            if entry.info is None or entry.quantization not in ("BF16", "FP16", "FP32"):
                return None
            return (entry.name if entry.origin == "hub cache" else str(entry.path)), entry.name
        original = entry if entry.convertible else catalog.original_of(entry, self.published)
        return (original.repo_id, original.repo_id) if original else None

    def _offer_conversion(self, entry: Entry) -> None:
        if self.ram_bytes is None:
            self.notify("This machine's memory is unknown: there is no size to convert to.", severity="error")
            return
        source = self._conversion_source(entry)
        if source is None:
            self.notify("No full-precision original of this model is known to convert from.", severity="warning")
            return
        ram_gb = catalog.ram_gb_for(self.ram_bytes)
        if isinstance(entry, PublishedModel):
            name, need = entry.repo_id, entry.memory_bytes()
        else:
            name, need = entry.name, entry.info and entry.info.memory_bytes()
        out = catalog.conversion_dir(source[1], ram_gb, self.models_dir)
        self.query_one("#detail").display = False
        self.panel.offer(Conversion(name, need, source[0], ram_gb, out))

    def _hide_convert_panel(self) -> None:
        self.panel.hide()
        self.query_one("#detail").display = True

    def action_convert(self) -> None:
        if self.panel.running:
            return
        if self.panel.conversion is None:
            entry = self._highlighted()
            if entry is not None:
                self._offer_conversion(entry)
            return
        self.panel.start()

    @on(ConvertPanel.Started)
    def _conversion_started(self) -> None:
        for table in self.query(DataTable):
            table.disabled = True

    @on(ConvertPanel.Ended)
    def _conversion_ended(self) -> None:
        for table in self.query(DataTable):
            table.disabled = False

    @on(ConvertPanel.Finished)
    def _conversion_finished(self, event: ConvertPanel.Finished) -> None:
        self.dismiss(event.out)

    @on(ConvertPanel.Closed)
    def _back_to_lists(self) -> None:
        self._hide_convert_panel()
        self.action_refresh()
        self.query_one("#published", DataTable).focus()

    # Closing

    def action_close(self) -> None:
        if self.panel.running:
            self.panel.ask_to_stop()
        elif self.panel.conversion is not None:
            self._back_to_lists()
        else:
            self.dismiss(None)
