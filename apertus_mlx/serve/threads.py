"""Crossing between the event loop and plain threads, for the stdio bridge."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any


def call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """`fn(*args)` on `loop`, from any thread; nothing once the loop has closed (the bridge has ended)."""
    with suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def off_loop(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """`fn(*args)` on a daemon thread, awaited. Unlike `asyncio.to_thread`, a call that never returns (a load
    that hangs) does not hold up the loop's exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def run() -> None:
        try:
            value, ok = fn(*args), True
        except BaseException as e:
            value, ok = e, False
        call_soon(loop, settle, ok, value)

    threading.Thread(target=run, name="stdio-wait", daemon=True).start()
    return future
