"""`Engine`: one long-lived MLX thread that owns the model; any thread submits work and reads events.

MLX streams are thread-local (since MLX 0.31.2), so a model must be loaded and run on the same
thread. The terminal app, the local server and the stdio bridge therefore never touch MLX
themselves: they queue jobs here and consume the events on their own threads.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from .events import Event
from .load import choose_model, load, load_model
from .mlx_thread import release_thread_state
from .session import ChatSession

T = TypeVar("T")
_END = object()


class Engine:
    """Loads a model on its own thread, then runs queued jobs there one at a time, in order."""

    def __init__(self, model: str | os.PathLike | None = None, draft_model: str | os.PathLike | None = None):
        self.model: Any = None
        self.tokenizer: Any = None
        self.draft_model: Any = None
        self.model_path: Path | None = None
        self.note: str | None = None  # set when the default model was not available and a fallback is used
        self._loaded: Future[None] = Future()
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._cancelled = threading.Event()  # set by close(cancel=True): turns stop, queued ones are skipped
        self._thread = threading.Thread(target=self._run, args=(model, draft_model), name="apertus-mlx", daemon=True)
        self._thread.start()
        # The thread must be out of MLX before the interpreter finalizes (mlx_thread.py says why); atexit
        # hooks run before finalization, so an engine the app did not close is closed there.
        atexit.register(self._close_at_exit)

    def wait_ready(self, timeout: float | None = None) -> Engine:
        """Block until the model is loaded; re-raises the loading error (e.g. `ModelNotFoundError`)."""
        self._loaded.result(timeout)
        return self

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run `fn(*args, **kwargs)` on the MLX thread after the jobs already queued."""
        future: Future[T] = Future()

        def job() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:
                    future.set_exception(e)

        self._jobs.put(job)
        return future

    def session(self, **kwargs: Any) -> ChatSession:
        """A new `ChatSession` on this engine's model (its KV cache is made on the MLX thread)."""
        self.wait_ready()
        kwargs.setdefault("draft_model", self.draft_model)
        return self.call(ChatSession, self.model, self.tokenizer, **kwargs).result()

    def stream(self, session: ChatSession, user_text: str | None = None, **overrides: Any) -> Iterator[Event]:
        """`session.stream(...)` run on the MLX thread, its events handed to the calling thread.

        Errors raised by the turn are raised here. Abandoning the iterator cancels the turn.
        """
        events: queue.Queue[Any] = queue.Queue()

        def job() -> None:
            try:
                if self._cancelled.is_set():
                    return
                for event in session.stream(user_text, **overrides):
                    events.put(event)
                    if self._cancelled.is_set():
                        session.cancel()  # the turn ends after this token, with Done("cancelled")
            except BaseException as e:
                events.put(e)
            finally:
                events.put(_END)

        self._jobs.put(job)
        finished = False
        try:
            while (item := events.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
            finished = True
        finally:
            if not finished:
                session.cancel()

    def close(self, timeout: float | None = None, cancel: bool = False) -> bool:
        """Finish the queued jobs, then stop the thread; False if it still runs after `timeout` seconds.

        With `cancel`, the running turn stops after its current token and queued turns are skipped.
        """
        if cancel:
            self._cancelled.set()
        self._jobs.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        atexit.unregister(self._close_at_exit)
        return True

    def _close_at_exit(self) -> None:
        self.close(cancel=True)

    def _run(self, model: str | os.PathLike | None, draft_model: str | os.PathLike | None) -> None:
        try:
            try:
                self.model_path, self.note = choose_model(model)
                self.model, self.tokenizer = load(self.model_path)
                self.draft_model = load_model(draft_model) if draft_model else None
            except BaseException as e:
                self._loaded.set_exception(e)  # queued jobs still run, so no caller waits forever
            else:
                self._loaded.set_result(None)
            while (job := self._jobs.get()) is not None:
                job()
        finally:
            release_thread_state()  # last MLX call on this thread: see mlx_thread.py
