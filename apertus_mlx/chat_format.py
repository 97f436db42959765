"""`ChatFormat`: render a chat in whatever message shape the checkpoint's chat template expects.

Apertus checkpoints come with one of two kinds of template:

- "blocks": the published Apertus format, which Hub checkpoints carry. An assistant message's reasoning is
  `content: {"blocks": [...]}` (`thoughts`, `response`, `tool_calls` with JSON-string arguments); tools are plain
  `{name, description, parameters}` specs; an assistant turn stays open until the next user message, and a
  generation prompt always adds `<|assistant_start|>`, even inside an open turn.
- "openai": the project's own template, which reads OpenAI-like messages (`reasoning_content`, `tool_calls`)
  and accepts tools with or without OpenAI's `{"type": "function", "function": {...}}` wrapper.

The session keeps its history in one canonical, OpenAI-compatible shape and lets `ChatFormat` translate it,
so that each earlier turn re-renders to the very tokens it was generated as and the KV cache stays valid:

    {"role": "system" | "user", "content": str | [{"type": "text", "text": str}, ...]}
    {"role": "assistant", "content": str,
     "reasoning_content": str,  # only when non-empty
     "tool_calls": [{"id": str, "type": "function", "function": {"name": str, "arguments": str}}]}  # only when any
    {"role": "tool", "content": str, "tool_call_id": str}  # the id is optional

A tool call's `arguments` is the JSON text exactly as the model wrote it (`ToolCall.raw_arguments`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Literal

from .errors import ApertusError
from .events import Channel, Event, TextDelta, ToolCall

Flavor = Literal["blocks", "openai"]
Message = dict[str, Any]

_PROBE = "apertus-mlx probes its template"  # reasoning text that only a blocks-reading template shows


class ChatFormat:
    """How one tokenizer's chat template wants a chat: probed once, then used for every render."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._ids = {
            name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
            for name in ("inner_prefix", "inner_suffix", "assistant_start", "assistant_end", "user_start", "user_end")
        }
        self.flavor: Flavor = self._probe()

    def _probe(self) -> Flavor:
        """The flavor: "blocks" when the template shows reasoning given as blocks, else "openai".

        Asking the template is more reliable than matching its source: the project's template reads a
        mapping as an empty part list and drops it, the published one renders its thoughts.
        """
        probe = [
            {"role": "system", "content": "s"},  # no default system text, so no date function is needed
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": {"blocks": [{"type": "thoughts", "text": _PROBE}]}},
        ]
        try:
            text = self._apply(probe, think=True, tools=None, generation_prompt=False)
        except Exception:  # a template that cannot read blocks may fail on them in any way
            return "openai"
        return "blocks" if _PROBE in text else "openai"

    # ---- rendering ------------------------------------------------------------------------------

    def default_system(self) -> str:
        """The template's own system text as it renders now (e.g. with today's date).

        A session fixes it when it is made and saves it with the chat, so that on a later day the
        rendered prefix, and the KV cache of it, stays the same.
        """
        text = self._apply([{"role": "user", "content": "u"}], think=False, tools=None, generation_prompt=False)
        start, end = text.find("<|system_start|>"), text.find("<|system_end|>")
        if start < 0 or end < start:
            raise ApertusError("the chat template has no <|system_start|>…<|system_end|> block")
        return text[start + len("<|system_start|>") : end]

    def render(
        self,
        messages: list[Message],
        *,
        system: str | None = None,
        think: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of the chat, ready for the model to write the next assistant tokens.

        `messages` are in the canonical shape (see the module docstring); `system`, when not None, is the
        system text (else the template's default). A generation prompt is asked for only when the chat
        does not end inside an open assistant turn: after a tool result the model continues the turn.
        """
        return self.tokenizer.encode(
            self.render_text(messages, system=system, think=think, tools=tools), add_special_tokens=False
        )

    def render_text(
        self,
        messages: list[Message],
        *,
        system: str | None = None,
        think: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The text that `render` tokenizes.

        A leading system message in `messages` (a client's own) is the system text, and `system` is then
        not used; a template error is raised as a one-line `ApertusError`.
        """
        converted = [self._message(m) for m in messages]
        if system is not None and not (converted and converted[0]["role"] == "system"):
            converted.insert(0, {"role": "system", "content": system})
        specs = [self._tool(t) for t in tools] if tools else None
        generation_prompt = not _ends_in_open_turn(messages)
        try:
            return self._apply(converted, think=think, tools=specs, generation_prompt=generation_prompt)
        except Exception as e:  # jinja's errors (and raise_exception's) have no common class
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ApertusError(f"the chat template cannot render this chat: {first}") from e

    def _apply(self, messages: list[Message], *, think: bool, tools: list | None, generation_prompt: bool) -> str:
        kwargs: dict[str, Any] = {"enable_thinking": think}
        if tools:
            kwargs["tools"] = tools
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False, **kwargs
        )

    # ---- canonical shape to the template's ----------------------------------------------------

    def _message(self, message: Message) -> Message:
        role = message["role"]
        if role == "assistant":
            return self._assistant(message)
        if role == "tool":
            content = message.get("content", "")
            text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
            out = {"role": "tool", "content": text}
            if message.get("tool_call_id"):
                out["tool_call_id"] = message["tool_call_id"]
            return out
        # Text parts are joined: the published template reads only strings or its own {"parts": ...}.
        return {"role": role, "content": _text(message.get("content"))}

    def _assistant(self, message: Message) -> Message:
        answer = _text(message.get("content"))
        reasoning = message.get("reasoning_content") or ""
        calls = [_call(c) for c in message.get("tool_calls") or []]
        if self.flavor == "openai":
            out: Message = {"role": "assistant", "content": answer}
            if reasoning:
                out["reasoning_content"] = reasoning
            if calls:
                out["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in calls
                ]
            return out
        # Blocks. Every assistant message must be in this shape once one is. The response block is always
        # there, even empty: it closes the reasoning (<|inner_suffix|>) before the answer or the tool calls,
        # as the model wrote it when it ended its reasoning first.
        blocks: list[dict[str, Any]] = []
        if reasoning:
            blocks.append({"type": "thoughts", "text": reasoning})
        blocks.append({"type": "response", "text": answer})
        if calls:
            blocks.append(
                {"type": "tool_calls", "calls": [{"name": c["name"], "arguments": c["arguments"]} for c in calls]}
            )
        return {"role": "assistant", "content": {"blocks": blocks}}

    def _tool(self, tool: dict[str, Any]) -> dict[str, Any]:
        """A tool spec as the template takes it: plain for the published format, OpenAI-wrapped otherwise."""
        spec = tool["function"] if isinstance(tool.get("function"), dict) else tool
        if not isinstance(spec.get("name"), str):
            raise ApertusError(f"a tool spec needs a name: {json.dumps(tool, ensure_ascii=False)[:80]}")
        if self.flavor == "openai":
            return {"type": "function", "function": spec}
        plain = {"name": spec["name"], "description": spec.get("description") or ""}
        if spec.get("parameters"):
            plain["parameters"] = spec["parameters"]
        return plain

    # ---- generated turns ------------------------------------------------------------------------

    def start_channel(self, prompt: list[int]) -> Channel:
        """The turn's first channel: "reasoning" if `prompt` ends in an open `<|inner_prefix|>` of its last turn.

        That happens when deliberation is forced open, or when the model called a tool from inside its
        reasoning and the prompt ends with the result; the parser must then start in the reasoning channel.
        Tool-call blocks do not close reasoning, so they are skipped.
        """
        ids = self._ids
        closers = {
            ids["inner_suffix"],
            ids["assistant_start"],
            ids["assistant_end"],
            ids["user_start"],
            ids["user_end"],
        }
        for token in reversed(prompt):
            if token == ids["inner_prefix"]:
                return "reasoning"
            if token in closers:
                return "answer"
        return "answer"


def assistant_message(events: Iterable[Event]) -> Message:
    """The canonical assistant message made of the events a consumer received in one turn.

    Only `TextDelta` and `ToolCall` events count, in order, so after a cancel the message is exactly what
    was shown. Rendering the history plus this message reproduces the turn's prompt and generated tokens,
    token for token, with either flavor of template, when the turn was one of:

    - an answer, `A`;
    - reasoning then an answer, `<|inner_prefix|>R<|inner_suffix|>A` (also with the prompt ending in
      `<|inner_prefix|>`, deliberation forced open);
    - either of those followed by tool calls, `…A<|tools_prefix|>[…]<|tools_suffix|>` (A may be empty);
    - the continuation after tool results, any of the above.

    Not exact:

    - a tool call made inside reasoning that was never closed, `<|inner_prefix|>R<|tools_prefix|>…`: the
      canonical shape cannot tell it from reasoning closed with an empty answer, so it re-renders with an
      `<|inner_suffix|>` before the calls, and the cache is reused only up to there;
    - the layout of a tool-call block around the arguments (spaces, a lone object instead of a list): the
      template writes `[{"name": ARGS}, {"name": ARGS}]`; the arguments themselves are kept as written;
    - a turn cut off (length, cancel) before it closed its reasoning or tool call: the template closes it;
    - text whose tokens are not the tokenizer's own encoding of it (the model may spell a word unusually).
    """
    answer: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCall] = []
    for event in events:
        if isinstance(event, TextDelta):
            (reasoning if event.channel == "reasoning" else answer).append(event.text)
        elif isinstance(event, ToolCall):
            calls.append(event)
    message: Message = {"role": "assistant", "content": "".join(answer)}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": _arguments_text(c.raw_arguments, c.arguments)},
            }
            for c in calls
        ]
    return message


def _ends_in_open_turn(messages: list[Message]) -> bool:
    """Whether the chat ends inside an assistant turn: after a tool result, or after tool calls."""
    if not messages:
        return False
    last = messages[-1]
    return last["role"] == "tool" or (last["role"] == "assistant" and bool(last.get("tool_calls")))


def _text(content: Any) -> str:
    """A message's text: a string as is, text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict)]
        if other := [p.get("type") for p in parts if p.get("type", "text") != "text"]:
            # Images and audio (Apertus 1.5) have no input path yet: refuse them rather than drop them unseen.
            raise ApertusError(f"message content part of type {other[0]!r} is not supported; only text parts are")
        return "".join(p.get("text", "") for p in parts)
    raise ApertusError(f"message content must be a string or a list of text parts, not {type(content).__name__}")


def _call(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call's id, name and arguments text, from the OpenAI shape (or an older `{function: {...}}`)."""
    fn = call.get("function", call)
    return {
        "id": call.get("id", ""),
        "name": fn["name"],
        "arguments": _arguments_text(None, fn.get("arguments", {})),
    }


def _arguments_text(raw: str | None, arguments: Any) -> str:
    if raw is not None:
        return raw
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)
