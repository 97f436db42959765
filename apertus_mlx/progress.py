"""Progress of long work (downloads, loading, conversion) as plain callbacks, for any face to show."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm


@dataclass(frozen=True)
class LoadProgress:
    """One update: `stage` ("download", "load", …), how far it is, and in what (`unit` "B" for bytes)."""

    stage: str
    done: float
    total: float | None = None
    unit: str = ""
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"type": "load_progress", **asdict(self)}


ProgressCallback = Callable[[LoadProgress], None]


def hub_tqdm(report: ProgressCallback) -> type[tqdm]:
    """A silent tqdm class for `huggingface_hub.snapshot_download(tqdm_class=…)` that forwards every update.

    The hub drives one bar per quantity (files, bytes); each update is reported as a "download" stage.
    """

    class _Forwarding(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["file"] = io.StringIO()  # nothing on the terminal: the face draws its own bar
            kwargs.pop("name", None)  # the hub's own bar class takes a logger name; tqdm does not
            kwargs["disable"] = False  # a disabled tqdm stops counting, and the count is what we forward
            super().__init__(*args, **kwargs)
            self._report()

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            self._report()
            return shown

        def _report(self) -> None:
            report(LoadProgress("download", self.n, self.total or None, self.unit or "", self.desc or ""))

    return _Forwarding
