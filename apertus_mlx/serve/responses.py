"""Engine events in OpenAI's shapes: streamed chunks, whole responses, usage and logprobs."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from apertus_mlx import ApertusError, EngineClosedError
from apertus_mlx.events import Done, TextDelta, TokenLogprobs, ToolCall, ToolCallError

from .errors import RequestError, first_line

# OpenAI's finish reasons. A cancelled turn only happens here when the HTTP client is gone; the stdio
# bridge, whose clients cancel on purpose, reports "cancelled" as it is.
FINISH = {"stop": "stop", "stop_string": "stop", "length": "length", "tool_calls": "tool_calls", "cancelled": "stop"}
LOWEST_LOGPROB = -9999.0  # what OpenAI reports for a token of probability 0 (JSON has no -Infinity)
ChunkHook = Callable[[dict[str, Any]], None]


async def start_turn(events: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Start the turn now, so bad input (too long for the context, a bad option) is a `RequestError`
    before anything is streamed; returns the turn's events, the first one included."""
    try:
        first = await anext(events)
    except EngineClosedError as e:
        raise RequestError(f"the model was unloaded: {first_line(e)}", status=503, kind="server_error") from None
    except (ApertusError, ValueError) as e:
        message = first_line(e)
        code = "context_length_exceeded" if "context" in message else None
        raise RequestError(message, param="messages" if code else None, code=code) from None

    async def chained() -> AsyncIterator[Any]:
        async with aclosing(events):
            yield first
            async for event in events:
                yield event

    return chained()


def usage(done: Done) -> dict[str, Any]:
    s = done.stats
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.prompt_tokens - s.prefilled_tokens},
    }


class LogprobText:
    """Token ids to the `{token, logprob, bytes, top_logprobs}` entries OpenAI's clients read."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def entry(self, event: TokenLogprobs) -> dict[str, Any]:
        return {
            **self._one(event.token, event.logprob),
            "top_logprobs": [self._one(token, logprob) for token, logprob in event.top],
        }

    def _one(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.tokenizer.decode([token])
        logprob = logprob if math.isfinite(logprob) else LOWEST_LOGPROB
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


class _Stream:
    """What both kinds of completion share: the turn's events, naming, and the optional hooks."""

    prefix = ""

    def __init__(
        self,
        events: AsyncIterator[Any],
        model: str,
        logprobs: LogprobText | None,
        include_usage: bool,
        *,
        finish: dict[str, str] = FINISH,
        on_chunk: ChunkHook | None = None,
    ):
        """`finish` maps the engine's finish reasons to the ones sent; `on_chunk` sees every chunk as it goes."""
        self.events, self.model, self.logprobs, self.include_usage = events, model, logprobs, include_usage
        self.finish, self.on_chunk = finish, on_chunk
        self.id = f"{self.prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.done: Done | None = None

    async def close(self) -> None:
        """End the turn if it is still running (the client is gone)."""
        await self.events.aclose()

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        async with aclosing(self._chunks()) as chunks:
            async for chunk in chunks:
                if self.on_chunk is not None:
                    self.on_chunk(chunk)
                yield chunk

    def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        raise NotImplementedError


class ChatStream(_Stream):
    """One chat completion: `chunks()` turns the turn's events into `chat.completion.chunk` objects,
    `response()` collects them into one `chat.completion`."""

    prefix = "chatcmpl-"

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs: list | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None}
        choice["finish_reason"] = finish
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        yield self._chunk({"role": "assistant", "content": ""})
        pending: list[dict[str, Any]] = []  # logprobs arrive before the text of their token
        calls = 0
        async for event in self.events:
            if isinstance(event, TokenLogprobs) and self.logprobs is not None:
                pending.append(self.logprobs.entry(event))
            elif isinstance(event, TextDelta):
                field = "content" if event.channel == "answer" else "reasoning_content"
                yield self._chunk({field: event.text}, logprobs=pending)
                pending = []
            elif isinstance(event, ToolCall):
                call = {"name": event.name, "arguments": event.raw_arguments or _json(event.arguments)}
                yield self._chunk(
                    {"tool_calls": [{"index": calls, "id": event.id, "type": "function", "function": call}]}
                )
                calls += 1
            elif isinstance(event, ToolCallError):
                yield self._chunk({"content": event.raw})
            elif isinstance(event, Done):
                self.done = event
                yield self._chunk({}, self.finish[event.finish_reason], logprobs=pending)
        if self.include_usage and self.done is not None:
            yield {**self._chunk({}), "choices": [], "usage": usage(self.done)}

    async def response(self) -> dict[str, Any]:
        content, reasoning, calls, logprobs = [], [], [], []
        finish = "stop"
        async for chunk in self.chunks():
            if not chunk["choices"]:
                continue
            choice = chunk["choices"][0]
            delta = choice["delta"]
            content.append(delta.get("content") or "")
            reasoning.append(delta.get("reasoning_content") or "")
            for call in delta.get("tool_calls", ()):
                calls.append({"id": call["id"], "type": "function", "function": call["function"]})
            if choice["logprobs"]:
                logprobs += choice["logprobs"]["content"]
            finish = choice["finish_reason"] or finish
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or (None if calls else "")}
        if "".join(reasoning):
            message["reasoning_content"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = calls
        out = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": {"content": logprobs} if self.logprobs is not None else None,
                    "finish_reason": finish,
                }
            ],
        }
        if self.done is not None:
            out["usage"] = usage(self.done)
        return out


class CompletionStream(_Stream):
    """One raw-prompt completion (`text_completion` objects), streamed or whole."""

    prefix = "cmpl-"

    def _chunk(self, text: str, finish: str | None = None, logprobs: list | None = None) -> dict[str, Any]:
        lp = None
        if self.logprobs is not None:
            entries = logprobs or []
            lp = {
                "tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            }
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        pending: list[dict[str, Any]] = []
        async for event in self.events:
            if isinstance(event, TokenLogprobs) and self.logprobs is not None:
                pending.append(self.logprobs.entry(event))
            elif isinstance(event, TextDelta):
                yield self._chunk(event.text, logprobs=pending)
                pending = []
            elif isinstance(event, Done):
                self.done = event
                yield self._chunk("", self.finish[event.finish_reason], logprobs=pending)
        if self.include_usage and self.done is not None:
            yield {**self._chunk(""), "choices": [], "usage": usage(self.done)}

    async def response(self) -> dict[str, Any]:
        text, finish, tokens, token_logprobs, top = [], "stop", [], [], []
        async for chunk in self.chunks():
            if not chunk["choices"]:
                continue
            choice = chunk["choices"][0]
            text.append(choice["text"])
            finish = choice["finish_reason"] or finish
            if choice["logprobs"]:
                tokens += choice["logprobs"]["tokens"]
                token_logprobs += choice["logprobs"]["token_logprobs"]
                top += choice["logprobs"]["top_logprobs"]
        out = self._chunk("".join(text), finish)
        if self.logprobs is not None:
            out["choices"][0]["logprobs"] = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top}
        if self.done is not None:
            out["usage"] = usage(self.done)
        return out


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
