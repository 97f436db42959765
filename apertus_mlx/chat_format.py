"""Placeholder until the published-format work lands."""

from __future__ import annotations

import json
from typing import Any

from .events import Event, TextDelta, ToolCall


def assistant_message(events: list[Event]) -> dict[str, Any]:
    answer = "".join(e.text for e in events if isinstance(e, TextDelta) and e.channel == "answer")
    reasoning = "".join(e.text for e in events if isinstance(e, TextDelta) and e.channel == "reasoning")
    calls = [e for e in events if isinstance(e, ToolCall)]
    message: dict[str, Any] = {"role": "assistant", "content": answer}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.raw_arguments or json.dumps(c.arguments)},
            }
            for c in calls
        ]
    return message


def _raw(call: ToolCall) -> str:
    return call.raw_arguments or json.dumps(call.arguments)
