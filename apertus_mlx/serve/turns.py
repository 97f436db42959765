"""One chat or completion request on an engine, as both faces run it: lease a chat from the pool, start the
turn (so bad input is refused before anything streams), and shape its events into OpenAI's chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from apertus_mlx import ApertusError, Engine
from apertus_mlx.vision import for_model

from .errors import RequestError, first_line
from .pool import Lease, SessionPool
from .requests import ChatRequest, CompletionRequest
from .responses import ChatStream, CompletionStream, LogprobText, start_turn

Stream = ChatStream | CompletionStream


@dataclass
class LeasedTurn:
    """A leased chat and its turn's events, not yet started. The caller releases `lease` when done."""

    lease: Lease
    events: AsyncIterator[Any]
    shape: Callable[[AsyncIterator[Any]], Stream]  # the started events to the response stream

    async def start(self) -> Stream:
        """Run the turn up to its first event; a refusal (`RequestError`) or any other failure gives the chat
        back to the pool, so no request can leave a slot taken."""
        try:
            events = await start_turn(self.events)
        except BaseException:  # refused, or anything unforeseen: the chat goes back either way
            self.lease.release()
            raise
        return self.shape(events)


def chat_turn(engine: Engine, pool: SessionPool, req: ChatRequest, **stream: Any) -> LeasedTurn:
    """`stream`: `ChatStream`'s keyword arguments (`finish`, `on_chunk`)."""
    if req.images:  # a model that cannot read images refuses them before a chat is leased
        try:
            for_model(engine.model, engine.tokenizer)
        except ApertusError as e:
            raise RequestError(f"{req.images[0]}: {first_line(e)}", param=req.images[0]) from None
    lease = pool.lease(req.messages, req.system, req.tools, req.think)
    text = LogprobText(engine.tokenizer) if req.logprobs else None
    name = engine.info.name
    return LeasedTurn(
        lease,
        engine.astream(lease.session, None, **req.options),
        lambda events: ChatStream(events, name, text, req.include_usage, **stream),
    )


def completion_turn(engine: Engine, pool: SessionPool, req: CompletionRequest, **stream: Any) -> LeasedTurn:
    """`stream`: `CompletionStream`'s keyword arguments (`finish`, `on_chunk`)."""
    lease = pool.lease([])
    text = LogprobText(engine.tokenizer) if "logprobs" in req.options else None
    name = engine.info.name
    return LeasedTurn(
        lease,
        engine.acomplete(lease.session, req.prompt, **req.options),
        lambda events: CompletionStream(events, name, text, req.include_usage, **stream),
    )
