"""The status line: model, quantization, context used, and the last answer's speed and memory."""

from __future__ import annotations

from textual.widgets import Static


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


class StatusLine(Static):
    """`model · quantization · context used/available · tok/s · time to first token · peak memory`."""

    def __init__(self, **kwargs):
        super().__init__("", markup=False, **kwargs)
        self.model = "loading…"
        self.quantization = ""
        self.context: tuple[int, int] | None = None
        self.last: str = ""

    def set_model(self, name: str, quantization: str, weights_bytes: int) -> None:
        self.model, self.quantization = name, f"{quantization} {_size(weights_bytes)}"
        self._draw()

    def set_context(self, used: int, available: int) -> None:
        self.context = (used, available)
        self._draw()

    def set_stats(self, stats) -> None:
        """The last answer's `Stats`."""
        self.last = (
            f"{stats.generation_tps:.1f} tok/s · TTFT {stats.time_to_first_token:.2f} s · "
            f"peak {stats.peak_memory_gb:.2f} GB"
        )
        self._draw()

    def _draw(self) -> None:
        parts = [self.model]
        if self.quantization:
            parts.append(self.quantization)
        if self.context:
            used, available = self.context
            parts.append(f"ctx {used:,}/{available:,}")
        if self.last:
            parts.append(self.last)
        self.update(" · ".join(parts))
