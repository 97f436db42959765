"""Typed events streamed by a chat turn: text deltas, tool calls, and a final `Done` with stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

Channel = Literal["answer", "reasoning"]
FinishReason = Literal["stop", "length", "stop_string", "tool_calls", "cancelled"]


@dataclass(frozen=True)
class TextDelta:
    """New text: the answer, or the model's private reasoning ("deliberation")."""

    text: str
    channel: Channel = "answer"


@dataclass(frozen=True)
class ToolCall:
    """A call the model asks the app to make; `arguments` is the parsed JSON object."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolCallError:
    """A tool-call block that is not valid (bad JSON, wrong shape, or cut off); `raw` is its text."""

    raw: str
    message: str


@dataclass(frozen=True)
class Stats:
    prompt_tokens: int  # the whole rendered prompt
    prefilled_tokens: int  # of those, the ones not already in the KV cache
    generated_tokens: int
    time_to_first_token: float  # seconds
    prompt_tps: float  # prefilled tokens per second
    generation_tps: float  # generated tokens per second after the first
    peak_memory_gb: float
    draft_accepted: int | None = None  # speculative decoding: tokens the draft got right


@dataclass(frozen=True)
class Done:
    """The turn's end: why it stopped, its full answer and reasoning, and its stats."""

    finish_reason: FinishReason
    stats: Stats
    answer: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # the generated token ids


Event = Union[TextDelta, ToolCall, ToolCallError, Done]  # noqa: UP007 (a runtime alias, Python 3.10)
