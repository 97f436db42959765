"""Typed events streamed by a chat turn: prefill progress, text deltas, tool calls, log-probabilities, `Done`.

Every event is a frozen dataclass with `to_dict()`, a JSON-ready dict tagged by `"type"`, which the
server and the stdio bridge send as they are.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, Union

Channel = Literal["answer", "reasoning"]
FinishReason = Literal["stop", "length", "stop_string", "tool_calls", "cancelled"]


class _Tagged:
    type: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """The event as plain JSON types, with its `type` tag first."""
        return {"type": self.type, **asdict(self)}


@dataclass(frozen=True)
class PrefillProgress(_Tagged):
    """The prompt is being read: `done` of `total` new tokens (those not already in the KV cache)."""

    type: ClassVar[str] = "prefill"
    done: int
    total: int


@dataclass(frozen=True)
class TextDelta(_Tagged):
    """New text: the answer, or the model's private reasoning ("deliberation")."""

    type: ClassVar[str] = "text"
    text: str
    channel: Channel = "answer"


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall(_Tagged):
    """A call the model asks the app to make; `arguments` is the parsed JSON object.

    `raw_arguments` is the arguments' JSON exactly as the model wrote it, so the call re-renders
    token for token in the next turn's prompt. `id` pairs the call with its result.
    """

    type: ClassVar[str] = "tool_call"
    name: str
    arguments: dict[str, Any]
    raw_arguments: str | None = None
    id: str = field(default_factory=new_tool_call_id, compare=False)


@dataclass(frozen=True)
class ToolCallError(_Tagged):
    """A tool-call block that is not valid (bad JSON, wrong shape, or cut off); `raw` is its text."""

    type: ClassVar[str] = "tool_call_error"
    raw: str
    message: str


@dataclass(frozen=True)
class TokenLogprobs(_Tagged):
    """Log-probability of one generated token, and the `top` likeliest (token id, log-probability) pairs.

    Streamed before the text of its token when a turn asks for `logprobs`.
    """

    type: ClassVar[str] = "logprobs"
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Stats:
    prompt_tokens: int  # the whole rendered prompt
    prefilled_tokens: int  # of those, the ones not already in the KV cache
    generated_tokens: int
    time_to_first_token: float  # seconds from the turn's submission
    prompt_tps: float  # prefilled tokens per second
    generation_tps: float  # generated tokens per second after the first
    peak_memory_gb: float  # the process's peak MLX memory so far
    draft_accepted: int | None = None  # speculative decoding: tokens the draft got right
    queued_seconds: float = 0.0  # time the turn waited before the engine started it


@dataclass(frozen=True)
class Done(_Tagged):
    """The turn's end: why it stopped, its full answer and reasoning, and its stats."""

    type: ClassVar[str] = "done"
    finish_reason: FinishReason
    stats: Stats
    answer: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # the generated token ids

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        return out


Event = Union[PrefillProgress, TextDelta, ToolCall, ToolCallError, TokenLogprobs, Done]  # noqa: UP007 (runtime alias)
