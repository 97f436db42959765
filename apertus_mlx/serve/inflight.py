"""The stdio bridge's requests in flight: each runs as its own task and is answered when it ends, so chats
stream side by side (batched in the engine) and any of them can be cancelled."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from apertus_mlx import ApertusError, Done, EngineClosedError, Stats

from .errors import RequestError, first_line, model_failed
from .loading import Loader, Slot
from .requests import ChatRequest, CompletionRequest
from .responses import FINISH, ChatStream, ChunkHook, CompletionStream
from .rpc import NO_MODEL, RpcError, Wire
from .turns import LeasedTurn, Stream

FINISH_STDIO = {**FINISH, "cancelled": "cancelled"}  # OpenAI's shape says "stop"; a client here asked to cancel

log = logging.getLogger("apertus_mlx.serve.stdio")


@dataclass(eq=False)
class Running:
    """A request in flight: its task, and for chats and completions what `cancel` needs."""

    id: Any
    method: str
    task: asyncio.Task[None] | None = None
    slot: Slot | None = None  # the model it answers with: a `load` replacing that model cancels it
    session: Any = None  # the leased chat while its turn runs
    stopped: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: float = field(default_factory=time.monotonic)

    @property
    def age(self) -> float:
        return time.monotonic() - self.started

    @property
    def cancelled(self) -> bool:
        return self.stopped.done()

    def cancel(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)  # wakes a request still waiting for its model
        if self.session is not None:
            self.session.cancel()  # the engine ends the turn after the current token: Done("cancelled")


class InFlight:
    """The running requests by id. Each is answered with its result or its error, and logged, when it ends."""

    def __init__(self, wire: Wire):
        self.wire = wire
        self._running: dict[Any, Running] = {}

    def __contains__(self, id: Any) -> bool:
        return id in self._running

    def __len__(self) -> int:
        return len(self._running)

    def __iter__(self) -> Iterator[Running]:
        return iter(list(self._running.values()))

    def get(self, id: Any) -> Running | None:
        return self._running.get(id)

    def start(self, id: Any, method: str, work: Callable[[Running], Awaitable[Any]]) -> None:
        running = Running(id, method)
        self._running[id] = running
        running.task = asyncio.ensure_future(self._answer(running, work(running)))

    async def end(self, requests: list[Running], cancel: bool = True) -> None:
        """Cancel `requests` (or let them finish) and wait until each is answered."""
        if cancel:
            for running in requests:
                running.cancel()
        tasks = {r.task for r in requests if r.task is not None}
        if tasks:
            await asyncio.wait(tasks)

    async def end_on(self, slot: Slot) -> None:
        """End the requests answering with `slot`'s model, as cancelled (a `load` replaces it)."""
        await self.end([r for r in self if r.slot is slot])

    async def _answer(self, running: Running, work: Awaitable[Any]) -> None:
        try:
            result = await work
        except RpcError as e:
            self.wire.error(running.id, e)
        except RequestError as e:
            self.wire.error(running.id, RpcError.from_request_error(e))
        except Exception as e:  # a bug in the bridge: answered, logged with its traceback, and the bridge goes on
            log.exception("%s %s failed", running.method, json.dumps(running.id))
            self.wire.error(running.id, RpcError.internal(e))
        else:
            self.wire.result(running.id, result)
            log.info("%s %s: %s in %.2f s", running.method, json.dumps(running.id), _summary(result), running.age)
        finally:
            if self._running.get(running.id) is running:
                del self._running[running.id]


async def answer_turn(
    running: Running,
    models: Loader,
    req: ChatRequest | CompletionRequest,
    begin: Callable[..., LeasedTurn],
    on_chunk: ChunkHook | None,
) -> dict[str, Any]:
    """The whole response to a chat or completion, once its model is ready; `begin` is `chat_turn` or
    `completion_turn`, and `on_chunk` sees each chunk on the way."""
    stream = {"finish": FINISH_STDIO, "on_chunk": on_chunk}
    slot = await models.ready(running.stopped, req.model)
    if slot is None:  # cancelled while its model was loading
        shape = ChatStream if isinstance(req, ChatRequest) else CompletionStream
        return await _response(shape(_cancelled(), req.model or "", None, False, **stream))
    running.slot = slot
    turn = begin(slot.engine, slot.pool, req, **stream)
    running.session = turn.lease.session  # from here on, `cancel` reaches the turn
    try:
        started = await turn.start()
        if running.cancelled:  # cancelled while the turn started
            turn.lease.session.cancel()
        return await _response(started)
    finally:
        running.session = None  # the chat goes back to the pool: a late cancel must not reach its next turn
        turn.lease.release()


async def _response(stream: Stream) -> dict[str, Any]:
    """The whole response; a model failing mid-answer is an error, and the bridge goes on."""
    try:
        return await stream.response()
    except EngineClosedError as e:
        raise RpcError(NO_MODEL, f"the model was unloaded: {first_line(e)}") from None
    except ApertusError as e:  # out of memory, a bug in the model's code
        raise RpcError.from_request_error(model_failed(e)) from None


async def _cancelled() -> AsyncIterator[Any]:
    """The events of a turn cancelled before it started (while its model was loading)."""
    yield Done("cancelled", Stats(0, 0, 0, 0.0, 0.0, 0.0, 0.0))


def _summary(result: Any) -> str:
    """A log line's worth of a result."""
    if isinstance(result, dict) and "choices" in result:
        usage = result.get("usage") or {}
        finish = result["choices"][0]["finish_reason"] if result["choices"] else None
        return f"{finish}, {usage.get('prompt_tokens', 0)} + {usage.get('completion_tokens', 0)} tokens"
    return "ok"
