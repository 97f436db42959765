"""`Turn`: one submitted assistant turn, handled as a transaction.

A turn is made when `stream()` is called: its prompt is rendered and its cancel flag exists from
then on. The chat's history changes once, when the turn ends (on the model's thread): the user
message and the answer are appended together. An error leaves the history as it was. When the
consumer stops reading early, the answer kept is exactly what it received.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .chat_format import assistant_message
from .events import Done, Event, Stats

if TYPE_CHECKING:
    from .sampling import SamplingOptions
    from .session import ChatSession

_ids = itertools.count()


class Turn:
    """What to answer, where its events go, its cancel flag, and its one commit to the chat's history."""

    def __init__(
        self,
        session: ChatSession,
        new_messages: list[dict[str, Any]],
        options: SamplingOptions,
        prompt: list[int],
        start_channel: str,
        sink: Callable[[Any], None],
        raw: bool = False,
    ):
        self.id = next(_ids)
        self.session, self.options, self.prompt, self.start_channel = session, options, prompt, start_channel
        self.base = list(session.messages)
        self.new_messages = new_messages
        self.submitted = time.perf_counter()
        self.cancelled = threading.Event()
        self.settled = threading.Event()  # the history is final (set by `settle` after an early stop)
        self.events: list[Event] = []
        self.delivered: int | None = None  # how many events the consumer took, once it stopped early
        self._sink = sink
        self.raw = raw  # a completion of a raw prompt: the chat's history is not touched
        self._committed: dict[str, Any] | None = None

    def put(self, event: Event) -> None:
        self.events.append(event)
        self._sink(event)

    def fail(self, error: BaseException) -> None:
        """End the turn with `error`; the chat's history is untouched."""
        self.session.release(self)
        self._sink(error)
        self.settled.set()

    def commit(self) -> None:
        """Append the user message and the answer to the chat's history, and free the chat for the next turn."""
        if self.raw:
            self.session.release(self)
            return
        message = assistant_message(self._kept())
        self.session.messages = [*self.base, *self.new_messages, message]
        self._committed = message
        self.session.release(self)

    def recommit(self) -> None:
        """After an early stop: keep only what the consumer received, unless the history was edited since."""
        messages = self.session.messages
        if self._committed is not None and messages and messages[-1] is self._committed:
            self._committed = assistant_message(self._kept())
            messages[-1] = self._committed

    def empty_stats(self) -> Stats:
        waited = time.perf_counter() - self.submitted
        return Stats(len(self.prompt), 0, 0, 0.0, 0.0, 0.0, 0.0, queued_seconds=waited)

    def _kept(self) -> list[Event]:
        return self.events if self.delivered is None else self.events[: self.delivered]


class Receipt:
    """The consumer's side of a turn: counts the events it took; an early stop cancels and settles.

    `settle` must end the turn on the model's thread and return once the history is final.
    """

    def __init__(self, turn: Turn, settle: Callable[[], None]):
        self.turn, self._settle = turn, settle
        self.received = 0
        self.finished = False

    def take(self, item: Any) -> Event:
        """`item` as handed over by the model's thread: an event to pass on, or an error to raise."""
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.received += 1
        if isinstance(item, Done):
            self.turn.session.last_stats = item.stats
            self.finished = True
        return item

    def stop(self) -> None:
        """The consumer is done reading: if the turn had not ended, cancel it and keep what was received."""
        if not self.finished:
            self.finished = True
            self.turn.delivered = self.received
            self.turn.cancelled.set()
            self._settle()


class TurnStream(Iterator[Event]):
    """The events of one submitted turn, ending with `Done`. Closing it early cancels the turn.

    `close()` works before the first event too; once it returns, the chat's history is final.
    """

    def __init__(self, receipt: Receipt, next_item: Callable[[], Any]):
        self._receipt, self._next_item = receipt, next_item

    def __next__(self) -> Event:
        if self._receipt.finished:
            raise StopIteration
        try:
            return self._receipt.take(self._next_item())
        except BaseException:
            self.close()  # e.g. Ctrl-C while waiting: the turn is cancelled, not left running
            raise

    def close(self) -> None:
        self._receipt.stop()

    def __del__(self) -> None:
        self.close()
