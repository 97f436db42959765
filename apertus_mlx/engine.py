"""`Engine`: one long-lived MLX thread that owns the model and schedules every chat's turns.

MLX streams are thread-local (since MLX 0.31.2), so a model must be loaded and run on one thread.
The terminal app, the local server and the stdio bridge never touch MLX themselves: they submit
turns here and read the events on their own threads (or in asyncio, with `astream`). Between two
scheduler steps the thread also runs `call()` jobs, so none of them waits for a whole turn.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import aclosing
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx

from . import residency
from .chat_format import image_urls
from .errors import EngineClosedError, TurnError
from .events import Event
from .load import DEFAULT_MODEL, choose_model, load, load_model
from .mlx_thread import release_thread_state
from .model_info import ModelInfo, describe_model
from .progress import LoadProgress, ProgressCallback
from .scheduler import Scheduler
from .session import ChatSession
from .turn import Receipt, Turn, TurnStream

T = TypeVar("T")
_POLL = 0.5  # seconds between checks that the engine thread is still alive, while waiting on it


class Engine:
    """Loads a model on its own thread, then runs the turns of any number of chats there, batched."""

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        draft_model: str | os.PathLike | None = None,
        progress: ProgressCallback | None = None,
        default: str = DEFAULT_MODEL,
    ):
        """Start loading `model` on the engine's thread (None: `$APERTUS_MODEL`, else `default`, else,
        when that cannot be had offline, the bundled demo model; see `choose_model`).

        `progress` is called there with `LoadProgress` updates: the download, if any, then loading.
        """
        self.model: Any = None
        self.tokenizer: Any = None
        self.draft_model: Any = None
        self.model_path: Path | None = None
        self.info: ModelInfo | None = None  # name, quantization, context length, size: set once loaded
        self.note: str | None = None  # set when the default model was not available and a fallback is used
        # A published format imported as it is (GGUF, GPTQ, NVFP4): what the import did, as lines to show.
        self.import_summary: list[str] = []
        self._loaded: Future[None] = Future()
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._closing = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(model, draft_model, progress, default), name="apertus-mlx", daemon=True
        )
        self._thread.start()
        # The thread must be out of MLX before the interpreter finalizes (mlx_thread.py says why); atexit
        # hooks run before finalization, so an engine the app did not close is closed there.
        atexit.register(self._close_at_exit)

    # ---- set-up and plain jobs ------------------------------------------------------------------

    def wait_ready(self, timeout: float | None = None) -> Engine:
        """Block until the model is loaded; re-raises the loading error (e.g. `ModelNotFoundError`)."""
        self._loaded.result(timeout)
        return self

    @property
    def ready(self) -> bool:
        """Whether the model is loaded; raises its loading error, or `EngineClosedError` once the engine stopped."""
        if not self._thread.is_alive():
            raise EngineClosedError("the engine is not running")
        if not self._loaded.done():
            return False
        self._loaded.result()
        return True

    def memory(self) -> dict[str, float]:
        """MLX's memory in GB: `active` (arrays in use), `cache` (freed buffers kept for reuse), `peak`."""
        gb = 1e9
        return {
            "active": mx.get_active_memory() / gb,
            "cache": mx.get_cache_memory() / gb,
            "peak": mx.get_peak_memory() / gb,
        }

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run `fn(*args, **kwargs)` on the MLX thread, between two scheduler steps."""
        self._check_open()
        future: Future[T] = Future()

        def job() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:
                    future.set_exception(e)

        self._post("call", (job, future))
        return future

    def session(self, **kwargs: Any) -> ChatSession:
        """A new `ChatSession` on this engine's model (`ChatSession`'s keyword arguments).

        Making one runs no MLX work, so it never waits for running turns.
        """
        self._check_open()
        self.wait_ready()
        kwargs.setdefault("draft_model", self.draft_model)
        return ChatSession(self.model, self.tokenizer, **kwargs)

    def restore(self, path: str | os.PathLike, **kwargs: Any) -> ChatSession:
        """A chat saved by `save` (or `ChatSession.save`), its KV cache loaded on the MLX thread."""
        self.wait_ready()
        kwargs.setdefault("draft_model", self.draft_model)
        return self.call(ChatSession.restore, path, self.model, self.tokenizer, **kwargs).result()

    def save(self, session: ChatSession, path: str | os.PathLike) -> Path:
        """Write `session` to `path` atomically (see `ChatSession.save`)."""
        return self.call(session.save, path).result()

    # ---- turns --------------------------------------------------------------------------------------

    def stream(
        self, session: ChatSession, user_text: str | None = None, images: list[Any] | None = None, **overrides: Any
    ) -> TurnStream:
        """Submit the next turn of `session` now; iterate its events (the same as `ChatSession.stream`'s).

        Bad input raises here, at once. Errors while the turn runs are raised by the iterator, with the
        chat left as it was. Closing the iterator early cancels the turn; once it is closed, or `Done`
        has arrived, `session.messages` is final. Images not yet encoded are encoded first, on the MLX thread.
        """
        self._check_open()
        self.wait_ready()
        events: queue.Queue[Any] = queue.Queue()
        message = session.user_message(user_text, images)
        if prepare := self._image_job(session, message):
            self.call(prepare).result()
        turn = session.new_turn(message, overrides, events.put)
        self._post("turn", turn)
        return TurnStream(Receipt(turn, lambda: self._settle(turn)), lambda: self._get(events))

    async def astream(
        self, session: ChatSession, user_text: str | None = None, images: list[Any] | None = None, **overrides: Any
    ) -> AsyncIterator[Event]:
        """`stream` for asyncio: the same events, awaited without blocking the event loop."""
        message = session.user_message(user_text, images)
        prepare = self._image_job(session, message)
        turn = self._aturn(lambda sink: session.new_turn(message, overrides, sink), prepare)
        async with aclosing(turn) as events:
            async for event in events:
                yield event

    @staticmethod
    def _image_job(session: ChatSession, message: dict[str, Any] | None) -> Callable[[], None] | None:
        """When the chat shows images: the job that encodes those it has not yet (to run on the MLX thread)."""
        new = [message] if message is not None else []
        if not image_urls([*session.messages, *new]) or session.encoded_images(new):
            return None
        return lambda: session.prepare_images(new)

    async def acomplete(self, session: ChatSession, text: str, **overrides: Any) -> AsyncIterator[Event]:
        """Continue the raw prompt `text` (no chat template; the chat's history is not changed), in asyncio."""
        async with aclosing(self._aturn(lambda sink: session.new_completion(text, overrides, sink))) as events:
            async for event in events:
                yield event

    async def _aturn(
        self, make_turn: Callable[[Callable[[Any], None]], Turn], prepare: Callable[[], None] | None = None
    ) -> AsyncIterator[Event]:
        self._check_open()
        loop = asyncio.get_running_loop()
        if not self._loaded.done():
            await asyncio.wrap_future(self._loaded)
        self.wait_ready()
        if prepare is not None:
            await asyncio.wrap_future(self.call(prepare))
        events: asyncio.Queue[Any] = asyncio.Queue()

        def sink(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody reads this turn any more
                turn.cancelled.set()

        turn = make_turn(sink)
        self._post("turn", turn)
        receipt = Receipt(turn, lambda: self._post("settle", turn))
        try:
            while not receipt.finished:
                yield receipt.take(await events.get())
        finally:
            if not receipt.finished:  # stopped early: the engine ends the turn, then the history is final
                receipt.stop()
                await loop.run_in_executor(None, self._wait_settled, turn)

    def close(self, cancel: bool = True, timeout: float | None = None) -> bool:
        """Stop the engine: running turns end as cancelled (or, with `cancel=False`, finish first).

        Afterwards `call`, `stream` and `session` raise `EngineClosedError`. Returns whether the MLX
        thread has ended (False if `timeout` ran out first, e.g. in the middle of loading the model).
        """
        self._closing.set()
        self._inbox.put(("close", cancel))
        if threading.current_thread() is self._thread:
            return False
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self._refuse_rest()
        atexit.unregister(self._close_at_exit)
        return True

    def _close_at_exit(self) -> None:
        self.close(cancel=True)

    # ---- the MLX thread -----------------------------------------------------------------------------

    def _run(self, model: Any, draft_model: Any, progress: ProgressCallback | None, default: str) -> None:
        try:
            self.model_path, self.note = choose_model(model, progress, default)
            self.info = describe_model(self.model_path, name=_requested_name(model, self.model_path))
            if progress:
                progress(LoadProgress("load", 0, 1, description=f"loading {self.info.name}"))
            self.model, self.tokenizer = load(self.model_path)
            self.draft_model = load_model(draft_model) if draft_model else None
            if (summary := getattr(self.model, "import_summary", None)) is not None:
                self.import_summary = summary.lines()
            wired = residency.wire(self.model)
            if progress:
                progress(LoadProgress("load", 1, 1, description=f"loaded {self.info.name}"))
        except BaseException as e:
            wired = None
            self._loaded.set_exception(e)  # jobs still run, so no caller waits forever
        else:
            self._loaded.set_result(None)
        scheduler = Scheduler(self.model)
        try:
            while self._handle(scheduler, block=not scheduler.busy):
                if scheduler.busy:
                    try:
                        scheduler.step()
                    except Exception as e:  # a bug outside any one turn: fail them all, keep serving
                        scheduler.fail_all(TurnError.wrap(e))
        finally:
            try:
                scheduler.cancel_all(EngineClosedError("the engine was closed"))
                self._refuse_rest()
                residency.unwire(wired)
            finally:
                release_thread_state()  # the last MLX call on this thread: see mlx_thread.py

    def _handle(self, scheduler: Scheduler, block: bool) -> bool:
        """Take everything posted so far (waiting for something when `block`); False once closing."""
        while True:
            try:
                kind, item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "turn":
                scheduler.submit(item)
            elif kind == "settle":
                scheduler.settle(item)
            elif kind == "call":
                item[0]()
            elif kind == "close":
                if item:  # cancel what runs
                    return False
                while scheduler.busy:
                    scheduler.step()
                return False

    def _refuse_rest(self) -> None:
        """After the loop: whatever was posted too late is refused, so no caller waits forever."""
        closed = EngineClosedError("the engine was closed")
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "turn":
                item.fail(closed)
            elif kind == "call" and item[1].set_running_or_notify_cancel():
                item[1].set_exception(closed)

    # ---- helpers --------------------------------------------------------------------------------------

    def _post(self, kind: str, item: Any) -> None:
        self._inbox.put((kind, item))
        if not self._thread.is_alive():  # posted after the thread ended: refuse it here
            self._refuse_rest()

    def _check_open(self) -> None:
        if self._closing.is_set() or not self._thread.is_alive():
            raise EngineClosedError("the engine is closed")

    def _get(self, events: queue.Queue[Any]) -> Any:
        while True:
            try:
                return events.get(timeout=_POLL)
            except queue.Empty:
                if not self._thread.is_alive():
                    try:
                        return events.get_nowait()
                    except queue.Empty:
                        return EngineClosedError("the engine stopped before the turn ended")

    def _settle(self, turn: Turn) -> None:
        self._inbox.put(("settle", turn))
        self._wait_settled(turn)

    def _wait_settled(self, turn: Turn) -> None:
        while not turn.settled.wait(_POLL):
            if not self._thread.is_alive():
                return


def _requested_name(requested: Any, path: Path) -> str | None:
    """The name the user gave (a repo id stays a repo id); None lets `describe_model` name a directory."""
    if requested and not Path(requested).expanduser().exists():
        return str(requested)
    return None
