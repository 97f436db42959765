"""Turn the tokens of one assistant turn into events: answer and reasoning text, and tool calls.

Apertus marks its private reasoning with `<|inner_prefix|>`…`<|inner_suffix|>` and tool calls with
`<|tools_prefix|>[{"name": {args}}, …]<|tools_suffix|>`. The markers are single special tokens, so
the parser switches channel on token ids and detokenizes only the text between them.
"""

from __future__ import annotations

import json
from typing import Any

from .events import Event, TextDelta, ToolCall, ToolCallError

MARKERS = ("<|inner_prefix|>", "<|inner_suffix|>", "<|tools_prefix|>", "<|tools_suffix|>")


class TurnParser:
    """Feed token ids one at a time; get back the events they complete."""

    def __init__(self, tokenizer: Any, start_channel: str = "answer"):
        ids = [tokenizer.convert_tokens_to_ids(m) for m in MARKERS]
        self._inner_start, self._inner_end, self._tools_start, self._tools_end = ids
        # Special tokens other than the markers (e.g. a stray <|user_start|>) carry no text.
        self._silent = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special
        }
        self._detokenizer = tokenizer.detokenizer
        self._channel = start_channel  # "answer", "reasoning" or "tools"
        self._tool_text: list[str] = []

    @property
    def in_tool_call(self) -> bool:
        return self._channel == "tools"

    def feed(self, token: int) -> list[Event]:
        if token == self._inner_start:
            return self._switch("reasoning")
        if token == self._inner_end:
            return self._switch("answer")
        if token == self._tools_start:
            return self._switch("tools")
        if token == self._tools_end:
            events = self._switch("answer")
            return events + parse_tool_calls("".join(self._tool_text))
        if token in self._silent:
            return []
        self._detokenizer.add_token(token)
        return self._emit(self._detokenizer.last_segment)

    def close(self) -> list[Event]:
        """Flush held-back text at the end of the turn; a tool call still open is an error."""
        events = self._flush()
        if self._channel == "tools":
            raw = "".join(self._tool_text)
            events.append(ToolCallError(raw, "tool call cut off before <|tools_suffix|>"))
        return events

    def _switch(self, channel: str) -> list[Event]:
        events = self._flush()
        if channel == "tools":
            self._tool_text = []
        self._channel = channel
        return events

    def _flush(self) -> list[Event]:
        self._detokenizer.finalize()
        events = self._emit(self._detokenizer.last_segment)
        self._detokenizer.reset()
        return events

    def _emit(self, text: str) -> list[Event]:
        if not text:
            return []
        if self._channel == "tools":
            self._tool_text.append(text)
            return []
        return [TextDelta(text, self._channel)]


def parse_tool_calls(raw: str) -> list[Event]:
    """`[{"name": {args}}, …]` to one `ToolCall` per entry, or a single `ToolCallError`."""
    try:
        calls = json.loads(raw)
    except json.JSONDecodeError as e:
        return [ToolCallError(raw, f"tool calls are not valid JSON: {e}")]
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        return [ToolCallError(raw, "tool calls must be a JSON list of {name: arguments} objects")]
    events: list[Event] = []
    for call in calls:
        if not (isinstance(call, dict) and len(call) == 1):
            return [ToolCallError(raw, f"tool call {json.dumps(call)} is not a single {{name: arguments}} object")]
        ((name, arguments),) = call.items()
        if not isinstance(arguments, dict):
            return [ToolCallError(raw, f"arguments of tool {name!r} are not a JSON object")]
        events.append(ToolCall(name, arguments))
    return events
