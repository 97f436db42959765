"""The stdio bridge's model: one `Engine` at a time, loaded (or replaced) on request, with progress sent to
the `load` requests waiting for it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from apertus_mlx import Engine
from apertus_mlx.progress import LoadProgress

from .errors import RequestError, first_line
from .pool import SessionPool
from .rpc import NO_MODEL, SHUTTING_DOWN, RpcError
from .threads import call_soon, off_loop

PROGRESS_EVERY = 0.1  # seconds between two progress notifications of one load (first and last always go)
CLOSE_TIMEOUT = 30.0  # seconds to wait for the engine thread at exit (it cannot stop in the middle of a load)

log = logging.getLogger("apertus_mlx.serve.stdio")


@dataclass(eq=False)
class Slot:
    """One model: loading, ready or failed. `ready` resolves once loading has ended; `error` says if it failed."""

    requested: str | None  # what `--model` or `load` asked for (None: the default choice)
    ready: asyncio.Future[None]
    watchers: list[Any]  # ids of the `load` requests told about its progress (None: the `--model` load)
    engine: Engine | None = None
    pool: SessionPool | None = None
    task: asyncio.Task[None] | None = None
    error: str | None = None
    last_progress: tuple[str, float] = ("", 0.0)  # stage and time of the last notification sent

    def entry(self) -> dict[str, Any]:
        """The slot as a `models` entry."""
        info = self.engine.info if self.engine is not None else None
        status = "failed" if self.error else "ready" if self.ready.done() else "loading"
        out: dict[str, Any] = {
            "id": info.name if info else self.requested,
            "object": "model",
            "owned_by": "apertus-mlx",
        }
        out["status"] = status
        if info is not None:
            out.update({k: v for k, v in info.to_dict().items() if k != "name"})
        if self.error:
            out["error"] = self.error
        if self.engine is not None and self.engine.note:
            out["note"] = self.engine.note
        return out


class Loader:
    """Holds the current `Slot`: starts loads (one at a time: a load cannot be interrupted), sends their
    progress, and hands requests the model once it is ready."""

    def __init__(
        self,
        pool_size: int,
        max_active: int,
        notify: Callable[[str, dict[str, Any]], None],
        end_requests: Callable[[Slot], Awaitable[None]],
    ):
        """`end_requests(slot)` cancels the requests answering with `slot`'s model and waits for them."""
        self.pool_size, self.max_active, self.notify, self.end_requests = pool_size, max_active, notify, end_requests
        self.slot: Slot | None = None
        self.announce = False  # whether the `--model` load's progress is sent: only once the client has initialized

    def start(self, model: str | None, watcher: Any) -> Slot:
        """Replace the model: requests on the old one end as cancelled, its engine closes, the new one loads."""
        old = self.slot
        slot = Slot(model, asyncio.get_running_loop().create_future(), [watcher])
        self.slot = slot
        slot.task = asyncio.ensure_future(self._bring_up(slot, old))
        return slot

    async def load(self, model: str | None, watcher: Any, stopped: asyncio.Future[None]) -> Slot:
        """The `load` request `watcher`: `model` once loaded. The model loaded or loading already is not
        reloaded. `stopped` resolving first (a shutdown) ends the wait."""
        slot = self.slot
        if slot is not None and slot.requested == model and not slot.error:
            slot.watchers.append(watcher)
        else:
            slot = self.start(model, watcher)
        try:
            await asyncio.wait({slot.ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watcher in slot.watchers:
                slot.watchers.remove(watcher)
        if not slot.ready.done():
            raise RpcError(SHUTTING_DOWN, "load: interrupted: the bridge is shutting down")
        if slot.error:
            raise RpcError(NO_MODEL, f"the model could not be loaded: {slot.error}")
        return slot

    async def ready(self, stopped: asyncio.Future[None], name: str | None) -> Slot | None:
        """The model to answer with, once it is ready (None: `stopped` resolved while it waited); a load that
        replaces it meanwhile is waited for too. `name` (None: any) must name the model loaded."""
        while True:
            slot = self.slot
            if slot is None:
                raise RpcError(NO_MODEL, "no model is loaded: send load first")
            await asyncio.wait({slot.ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stopped.done():
                return None
            if slot is not self.slot:  # replaced while loading: wait for the new one
                continue
            if slot.error:
                raise RpcError(NO_MODEL, f"the model could not be loaded: {slot.error}")
            break
        info = slot.engine.info
        if name is not None and name not in (info.name, str(info.path)):
            raise RequestError(
                f"model {name!r} is not loaded here; this bridge has {info.name!r} (send load to change it)",
                status=404,
                param="model",
                code="model_not_found",
            )
        return slot

    async def close(self) -> bool:
        """Close the engine; False if it could not be (still loading, which cannot be interrupted)."""
        slot = self.slot
        if slot is None:
            return True
        if not slot.ready.done() or slot.engine is None:
            return False
        return await off_loop(slot.engine.close, True, CLOSE_TIMEOUT)

    async def _bring_up(self, slot: Slot, old: Slot | None) -> None:
        if old is not None:
            if old.task is not None:
                await asyncio.wait({old.task})
            await self.end_requests(old)
            if old.engine is not None:
                await off_loop(old.engine.close, True)
        log.info("loading %s", slot.requested or "the default model")
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            slot.engine = Engine(slot.requested, progress=lambda p: call_soon(loop, self._progress, slot, p))
            await off_loop(slot.engine.wait_ready)
            slot.pool = SessionPool(slot.engine, self.pool_size, self.max_active)
        except Exception as e:
            slot.error = first_line(e)
            log.error("loading %s failed: %s", slot.requested or "the default model", slot.error)
            slot.ready.set_result(None)
            return
        info = slot.engine.info
        log.info("loaded %s (%s) in %.1f s", info.name, info.quantization, time.monotonic() - t0)
        if slot.engine.note:
            log.info("%s", slot.engine.note)
        for line in slot.engine.import_summary:
            log.info("%s", line)
        slot.ready.set_result(None)

    def _progress(self, slot: Slot, p: LoadProgress) -> None:
        now = time.monotonic()
        last_stage, last_time = slot.last_progress
        final = p.total is not None and p.done >= p.total
        if p.stage == last_stage and not final and p.done and now - last_time < PROGRESS_EVERY:
            return
        slot.last_progress = (p.stage, now)
        params = {k: v for k, v in p.to_dict().items() if k != "type"}
        for watcher in list(slot.watchers):
            if watcher is not None or (self.announce and slot is self.slot):
                self.notify("progress", {"id": watcher, **params})
