"""Turn the tokens of one assistant turn into events: answer and reasoning text, and tool calls.

Apertus marks its private reasoning with `<|inner_prefix|>`…`<|inner_suffix|>` and tool calls with
`<|tools_prefix|>[{"name": {args}}, …]<|tools_suffix|>`. Each marker is a single token, so the parser
switches channel on token ids and detokenizes only the text between them. The ids are looked up by name
in the tokenizer: special tokens in Apertus 1, plain ones (the reasoning markers, ids 32 and 33) in 1.5.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .events import Channel, Event, TextDelta, ToolCall, ToolCallError

MARKERS = ("<|inner_prefix|>", "<|inner_suffix|>", "<|tools_prefix|>", "<|tools_suffix|>")


class TurnParser:
    """Feed token ids one at a time; get back the events they complete.

    `start_channel` is where the turn begins: "reasoning" when the prompt already opened an
    `<|inner_prefix|>` section (see `ChatFormat.start_channel`). A tool-call block returns to the channel
    it interrupted, so a call made while reasoning is followed by more reasoning.

    Text is passed on exactly as the tokens spell it, a section's leading space included: the next turn
    re-renders it, and a dropped space would change the tokens the KV cache holds.
    """

    def __init__(self, tokenizer: Any, start_channel: Channel = "answer"):
        ids = [tokenizer.convert_tokens_to_ids(m) for m in MARKERS]
        ids = [-1 if i is None or i == tokenizer.unk_token_id else i for i in ids]  # a marker the tokenizer lacks
        self._inner_start, self._inner_end, self._tools_start, self._tools_end = ids
        # Special tokens other than the markers (e.g. a stray <|user_start|>) carry no text.
        self._silent = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special
        }
        self._detokenizer = tokenizer.detokenizer
        # Streaming detokenizers drop the leading space of the first text they see. Priming each section
        # with a plain character (whose text is then discarded) makes its real first token keep its space.
        self._prime = tokenizer.encode("a", add_special_tokens=False)
        self._restart_detokenizer()
        self._channel: str = start_channel  # or "tools"
        self._resume: str = start_channel  # the channel a tool-call block returns to
        self._tool_text: list[str] = []

    @property
    def channel(self) -> str:
        """Where the next text goes: "answer", "reasoning" or "tools"."""
        return self._channel

    def feed(self, token: int) -> list[Event]:
        if token == self._inner_start:
            return self._switch("reasoning")
        if token == self._inner_end:
            return self._switch("answer")
        if token == self._tools_start:
            if self._channel != "tools":
                self._resume = self._channel
            return self._switch("tools")
        if token == self._tools_end:
            events = self._switch(self._resume)
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

    def _restart_detokenizer(self) -> None:
        self._detokenizer.reset()
        for token in self._prime:
            self._detokenizer.add_token(token)
        self._detokenizer.finalize()
        _ = self._detokenizer.last_segment  # the primer's text is not part of the turn

    def _flush(self) -> list[Event]:
        self._detokenizer.finalize()
        events = self._emit(self._detokenizer.last_segment)
        self._restart_detokenizer()
        return events

    def _emit(self, text: str) -> list[Event]:
        if not text:
            return []
        if self._channel == "tools":
            self._tool_text.append(text)
            return []
        return [TextDelta(text, self._channel)]


def parse_tool_calls(raw: str) -> list[Event]:
    """`[{"name": {args}}, …]` to one `ToolCall` per entry, or a single `ToolCallError`.

    Each call's `raw_arguments` is the exact text of its arguments in `raw`, so the call re-renders as
    the model wrote it; each gets a fresh `id`. A block is either all calls or one error, never both.
    """
    try:
        calls = json.loads(raw)
    except json.JSONDecodeError as e:
        return [ToolCallError(raw, f"tool calls are not valid JSON: {e}")]
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        return [ToolCallError(raw, "tool calls must be a JSON list of {name: arguments} objects")]
    if not calls:
        return [ToolCallError(raw, "the tool-call block holds no calls")]
    for call in calls:
        if not (isinstance(call, dict) and len(call) == 1):
            return [ToolCallError(raw, f"tool call {json.dumps(call)} is not a single {{name: arguments}} object")]
        ((name, arguments),) = call.items()
        if not isinstance(arguments, dict):
            return [ToolCallError(raw, f"arguments of tool {name!r} are not a JSON object")]
    spans = _argument_spans(raw)
    if len(spans) != len(calls):  # e.g. a repeated key that json.loads merged into one
        return [ToolCallError(raw, "tool calls must be a JSON list of {name: arguments} objects")]
    entries = [next(iter(call.items())) for call in calls]
    return [ToolCall(name, args, raw_arguments=span) for (name, args), span in zip(entries, spans, strict=True)]


_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def _argument_spans(raw: str) -> list[str]:
    """The text of each call's arguments in `raw`, which `json.loads` has already accepted.

    Walks the list with `raw_decode`, which reports where each value ends; returns [] for a shape
    other than a list (or lone object) of single-key objects.
    """
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        return _SPACE.match(raw, i).end()

    def expect(i: int, char: str) -> int:
        if raw[i : i + 1] != char:
            raise ValueError(char)
        return skip(i + 1)

    spans: list[str] = []
    try:
        i = skip(0)
        single = raw[i : i + 1] == "{"
        if not single:
            i = expect(i, "[")
        while raw[i : i + 1] == "{":
            i = skip(i + 1)
            _, i = decoder.raw_decode(raw, i)  # the name
            i = expect(skip(i), ":")
            _, end = decoder.raw_decode(raw, i)
            spans.append(raw[i:end])
            i = expect(skip(end), "}")
            if single or raw[i : i + 1] != ",":
                break
            i = skip(i + 1)
    except ValueError:
        return []
    return spans
