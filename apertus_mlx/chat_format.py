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
    {"role": "user", "content": [{"type": "text", "text": str} | {"type": "image_url", "image_url": {"url": str}}, ...]}
    {"role": "assistant", "content": str,
     "reasoning_content": str,  # only when non-empty
     "tool_calls": [{"id": str, "type": "function", "function": {"name": str, "arguments": str}}]}  # only when any
    {"role": "tool", "content": str, "tool_call_id": str}  # the id is optional

A tool call's `arguments` is the JSON text exactly as the model wrote it (`ToolCall.raw_arguments`).

Images (Apertus 1.5) are OpenAI's `image_url` parts of user messages, their URL a `data:` URL or a local file. The
template is given an `<|image|>` placeholder where each image is: as a `{"type": "image"}` part (the convention of
transformers' multimodal templates) when the template renders one, else written into the message's text. The
session turns the rendered placeholders into the images' token ids (`vision.ImageTokenizer`).
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
DEFAULT_IMAGE_TOKEN = "<|image|>"


class ChatFormat:
    """How one tokenizer's chat template wants a chat: probed once, then used for every render."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._ids = {
            name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
            for name in ("inner_prefix", "inner_suffix", "assistant_start", "assistant_end", "user_start", "user_end")
        }
        self.flavor: Flavor = self._probe()
        token = getattr(tokenizer, "image_token", None)
        self.image_token = token if isinstance(token, str) and token else DEFAULT_IMAGE_TOKEN
        self._image_parts: bool | None = None  # whether the template renders {"type": "image"} parts: probed once

    @property
    def image_parts(self) -> bool:
        """Whether the template writes an image placeholder for a `{"type": "image"}` content part (asked once);
        otherwise images are given to it as the placeholder text inside the message's string."""
        if self._image_parts is None:
            probe = [
                {"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": _PROBE}, {"type": "image"}]},
            ]
            try:
                text = self._apply(probe, think=False, tools=None, generation_prompt=False)
            except Exception:  # a template that reads only strings may fail on a list in any way
                text = ""
            self._image_parts = _PROBE + self.image_token in text
        return self._image_parts

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
        Images are not tokenized here: `ChatSession.render` fills their placeholders from the image tokenizer.
        """
        if image_urls(messages):
            raise ApertusError("a chat with images is rendered by ChatSession.render (its image tokenizer)")
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
        content = message.get("content")
        if role == "user" and isinstance(content, list) and any(_is_image(p) for p in content):
            return {"role": role, "content": self._with_images(content)}
        # Text parts are joined: the published template reads only strings or its own {"parts": ...}.
        return {"role": role, "content": _text(content)}

    def _with_images(self, content: list[Any]) -> str | list[dict[str, Any]]:
        """A user message's text and image parts as the template takes them (see the module docstring)."""
        parts: list[dict[str, Any]] = []
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type", "text")
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind == "image_url":
                part_url(part)
                parts.append({"type": "image"})
            else:
                raise ApertusError(f"message content part of type {kind!r} is not supported; only text and images are")
        if self.image_parts:
            return parts
        return "".join(p["text"] if p["type"] == "text" else self.image_token for p in parts)

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


def image_urls(messages: list[Message]) -> list[str]:
    """The URLs of the images in the user messages of `messages`, in the order the chat shows them."""
    urls = []
    for message in messages:
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, list):
            urls += [part_url(p) for p in content if _is_image(p)]
    return urls


def part_url(part: dict[str, Any]) -> str:
    """The URL of an `image_url` content part; a one-line error when the part is not in OpenAI's shape."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else None
    if not isinstance(url, str) or not url:
        raise ApertusError('an image_url part needs {"image_url": {"url": "data:…" or a file path}}')
    return url


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image_url"


def _text(content: Any) -> str:
    """A message's text: a string as is, text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict)]
        if other := [p.get("type") for p in parts if p.get("type", "text") != "text"]:
            # Images are read in user messages only (see `_with_images`), audio not at all: refused, never dropped.
            if other[0] == "image_url":
                raise ApertusError("an image_url content part is only read in a user message")
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
