"""Turn assembly: the scheduler feeds one turn's tokens here, one at a time, and gets back its events.

It owns what a turn's tokens mean (channels, tool calls, stop strings, end of turn) and nothing of
how they were computed, so solo, batched and speculative decoding all share it.
"""

from __future__ import annotations

from typing import Any

from .events import Event, TextDelta, ToolCall, ToolCallError
from .turn_parser import TurnParser


class TurnAssembler:
    """Feed generated token ids; collect the events they complete and whether the turn has ended."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), start_channel: str = "answer"):
        self.eos = set(tokenizer.eos_token_ids)
        self.parser = TurnParser(tokenizer, start_channel=start_channel)
        self.stops = StopMatcher(stop)
        self.tokens: list[int] = []
        self.finish: str | None = None  # set once the turn has ended: stop, stop_string or tool_calls

    def feed(self, token: int) -> list[Event]:
        """The events `token` completes; sets `finish` when it ends the turn."""
        self.tokens.append(token)
        if token in self.eos:
            self.finish = "stop"
            return self._flush()
        return self._route(self.parser.feed(token))

    def close(self) -> list[Event]:
        """Text still held back when the turn ends for another reason (length, cancel)."""
        if self.finish == "stop_string":
            return []
        return self._flush()

    def _flush(self) -> list[Event]:
        return self._route(self.parser.close()) + self._answer(self.stops.flush())

    def _route(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for event in events:
            if isinstance(event, TextDelta) and event.channel == "answer":
                text, hit = self.stops.feed(event.text)
                out += self._answer(text)
                if hit:
                    self.finish = "stop_string"
                    return out
                continue
            # Answer text held back by the stop matcher was said before this event.
            out += self._answer(self.stops.flush())
            out.append(event)
            if isinstance(event, ToolCall):
                self.finish = "tool_calls"  # the app runs the tools, then the turn continues
            elif isinstance(event, ToolCallError):
                self.finish = "stop"  # nothing to run: the turn ends, the error says why
        return out

    @staticmethod
    def _answer(text: str) -> list[Event]:
        return [TextDelta(text, "answer")] if text else []


class StopMatcher:
    """Holds back answer text that might be the start of a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was completed)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
