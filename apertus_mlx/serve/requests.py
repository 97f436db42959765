"""Parse and check OpenAI-style request bodies; every refusal names the field at fault.

Whatever a request asks for is either honoured or refused with a 400: unknown fields, roles and
content types are refused, never ignored.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apertus_mlx.vision import ImageError, image_source

from .errors import RequestError, bad

ROLES = ("system", "developer", "user", "assistant", "tool")
THINK_EFFORTS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}
# Accepted and honoured trivially: metadata for the caller, or a value that asks for nothing we do not do.
_PASSIVE = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_tokens: int = 4096  # per answer
    default_max_tokens: int = 1024


@dataclass
class ChatRequest:
    """A chat completion, translated to the engine's terms."""

    model: str | None
    messages: list[dict[str, Any]]  # OpenAI-like, the system message taken out
    system: str | None
    tools: list[dict[str, Any]] | None
    think: bool
    options: dict[str, Any]  # `SamplingOptions` fields for this turn
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)  # where each image part is (`messages[i].content[j]`)


@dataclass
class CompletionRequest:
    """A raw-prompt completion (`/v1/completions`)."""

    model: str | None
    prompt: str
    options: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    logprobs: int = 0
    echo: bool = False


_CHAT_FIELDS = {
    "model",
    "messages",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "tools",
    "tool_choice",
    "reasoning_effort",
    "chat_template_kwargs",
    "logprobs",
    "top_logprobs",
    "response_format",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
} | _PASSIVE
_COMPLETION_FIELDS = {
    "model",
    "prompt",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "echo",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "user",
}


def parse_chat(body: Any, limits: Limits) -> ChatRequest:
    body = _object(body, "body")
    _known(body, _CHAT_FIELDS)
    system, messages, images = _messages(body.get("messages"))
    tools = _tools(body.get("tools"))
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        tools = None  # the model is not shown the tools, so it cannot call them
    elif choice == "required" or isinstance(choice, dict):
        raise bad("tool_choice", "'required' and named functions are not supported; use 'auto' or 'none'")
    elif choice != "auto":
        raise bad("tool_choice", f"expected 'auto' or 'none', got {json.dumps(choice)}")
    if body.get("parallel_tool_calls") is False:
        raise bad("parallel_tool_calls", "false is not supported: Apertus may answer with several calls")
    logprobs = _type(body, "logprobs", bool, False)
    top = _int(body, "top_logprobs", 0, 0, 20)
    if top and not logprobs:
        raise bad("top_logprobs", "needs logprobs: true")
    options = _sampling(body, limits, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens")
    if logprobs:
        options["logprobs"] = top
    fmt = body.get("response_format")
    if fmt is not None and _object(fmt, "response_format").get("type") != "text":
        options["response_format"] = fmt
    stream, usage = _streaming(body)
    return ChatRequest(
        model=_model(body),
        messages=messages,
        system=system,
        tools=tools,
        think=_think(body),
        options=options,
        stream=stream,
        include_usage=usage,
        logprobs=logprobs,
        top_logprobs=top,
        images=images,
    )


def parse_completion(body: Any, limits: Limits) -> CompletionRequest:
    body = _object(body, "body")
    _known(body, _COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt", "expected a non-empty string (one prompt per request)")
    if body.get("echo"):
        raise bad("echo", "true is not supported")
    logprobs = body.get("logprobs")
    logprobs = 0 if logprobs is None else _int(body, "logprobs", 0, 0, 20)
    options = _sampling(body, limits, "max_tokens", default_max=16)  # OpenAI's default for completions
    if "logprobs" in body and body["logprobs"] is not None:
        options["logprobs"] = logprobs
    stream, usage = _streaming(body)
    return CompletionRequest(_model(body), prompt, options, stream, usage, logprobs)


# ---- pieces ---------------------------------------------------------------------------------------------


def _messages(value: Any) -> tuple[str | None, list[dict[str, Any]], list[str]]:
    if not isinstance(value, list) or not value:
        raise bad("messages", "expected a non-empty list of messages")
    system, out, images = None, [], []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        message = _object(message, where)
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"unknown role {json.dumps(role)} (expected one of {', '.join(ROLES)})")
        unknown = set(message) - {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"}
        if unknown:
            raise bad(f"{where}.{sorted(unknown)[0]}", "unknown field")
        content = _content(
            message.get("content"), f"{where}.content", role == "assistant", images if role == "user" else None
        )
        if role in ("system", "developer"):
            if out or system is not None:
                raise bad(f"{where}.role", "a system message must come first, and only once")
            system = content
            continue
        clean: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            if message.get("reasoning_content"):
                clean["reasoning_content"] = _type(message, "reasoning_content", str, "", where)
            if message.get("tool_calls"):
                clean["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
            if not content and "tool_calls" not in clean:
                raise bad(f"{where}.content", "an assistant message needs content or tool_calls")
        if role == "tool" and "tool_call_id" in message:
            clean["tool_call_id"] = _type(message, "tool_call_id", str, "", where)
        out.append(clean)
    if not out:
        raise bad("messages", "there is no user message to answer")
    if out[-1]["role"] not in ("user", "tool"):
        raise bad(f"messages[{len(value) - 1}].role", "the last message must be from the user or a tool")
    return system, out, images


def _content(value: Any, where: str, optional: bool = False, images: list[str] | None = None) -> Any:
    """A message's content: a string (text parts joined), or, when a user message has images, its text and
    `image_url` parts in order (their places appended to `images`). Images elsewhere are refused."""
    if value is None and optional:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(value):
            at = f"{where}[{j}]"
            part = _object(part, at)
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": _type(part, "text", str, "", at)})
            elif kind == "image_url":
                if images is None:
                    raise bad(f"{at}.type", "images are only read in user messages")
                parts.append(_image_part(part, at))
                images.append(at)
            else:
                raise bad(f"{at}.type", f"{json.dumps(kind)} is not supported; only text and image_url parts are")
        if all(p["type"] == "text" for p in parts):
            return "".join(p["text"] for p in parts)
        return parts
    raise bad(where, "expected a string or a list of content parts")


def _image_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    """An `image_url` part whose URL is a base64 `data:` URL or a local file (`file://` or an absolute path).

    Nothing is fetched: a local server reads no URL on a client's behalf. The image itself is decoded when the
    turn starts; here only its header is checked, so a body that is not an image is refused naming its part."""
    _known(part, {"type", "image_url"}, f"{where}.")
    spec = _object(part.get("image_url"), f"{where}.image_url")
    _known(spec, {"url", "detail"}, f"{where}.image_url.")
    url = _type(spec, "url", str, None, f"{where}.image_url")
    if spec.get("detail", "auto") not in ("auto", "high"):
        raise bad(f"{where}.image_url.detail", f"{json.dumps(spec['detail'])} is not supported (images are read whole)")
    at = f"{where}.image_url.url"
    if not url.startswith(("data:", "file:")) and "://" not in url and not Path(url).is_absolute():
        raise bad(at, "expected a data: URL (base64), a file:// URL or an absolute file path")
    try:
        source = image_source(url)
    except ImageError as e:
        raise bad(at, str(e)) from None
    if isinstance(source, Path):
        if not source.is_absolute():
            raise bad(at, "expected an absolute file path")
        if not source.is_file():
            raise bad(at, f"no such file: {source}")
        try:
            source = source.read_bytes()
        except OSError as e:
            raise bad(at, f"cannot read {source} ({e.strerror})") from None
    _check_image_header(source, at)
    return {"type": "image_url", "image_url": {"url": url}}


def _check_image_header(data: bytes, where: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)):
            pass
    except (UnidentifiedImageError, OSError, ValueError):
        raise bad(where, f"not an image ({len(data)} bytes of an unknown format)") from None


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise bad(where, "expected a list")
    calls = []
    for i, call in enumerate(value):
        call = _object(call, f"{where}[{i}]")
        function = _object(call.get("function"), f"{where}[{i}].function")
        name = _type(function, "name", str, None, f"{where}[{i}].function")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, (str, dict)):
            raise bad(f"{where}[{i}].function.arguments", "expected a JSON string")
        entry = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if "id" in call:
            entry["id"] = _type(call, "id", str, "", f"{where}[{i}]")
        calls.append(entry)
    return calls


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad("tools", "expected a list of tools")
    for i, tool in enumerate(value):
        tool = _object(tool, f"tools[{i}]")
        if tool.get("type") != "function":
            raise bad(f"tools[{i}].type", "only 'function' tools are supported")
        function = _object(tool.get("function"), f"tools[{i}].function")
        _type(function, "name", str, None, f"tools[{i}].function")
        if "parameters" in function:
            _object(function["parameters"], f"tools[{i}].function.parameters")
    return value or None


def _sampling(body: dict[str, Any], limits: Limits, max_field: str, default_max: int | None = None) -> dict[str, Any]:
    if body.get("n", 1) != 1:
        raise bad("n", "only n = 1 is supported; send several requests (they run batched)")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, 0.0, -2, 2):
            raise bad(name, "is not supported; use repetition_penalty (1.0-1.5)")
    options: dict[str, Any] = {
        "max_tokens": _int(body, max_field, default_max or limits.default_max_tokens, 1, None),
        "temperature": _number(body, "temperature", 0.8, 0, 2),
        "top_p": _number(body, "top_p", 0.9, 0, 1, open_low=True),
    }
    if options["max_tokens"] > limits.max_tokens:
        raise bad(max_field, f"{options['max_tokens']} is over this server's limit of {limits.max_tokens}")
    if "top_k" in body:
        options["top_k"] = _int(body, "top_k", 0, 0, None)
    if "min_p" in body:
        options["min_p"] = _number(body, "min_p", 0.0, 0, 1)
    if body.get("repetition_penalty") is not None:
        options["repetition_penalty"] = _number(body, "repetition_penalty", 1.0, 0, 10, open_low=True)
    if body.get("seed") is not None:
        options["seed"] = _int(body, "seed", 0, None, None)
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "expected a string or a list of up to 4 non-empty strings")
        options["stop"] = tuple(stop)
    return options


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _type(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    options = _object(options, "stream_options")
    if not stream:
        raise bad("stream_options", "is only allowed with stream: true")
    _known(options, {"include_usage"}, "stream_options.")
    return stream, _type(options, "include_usage", bool, False, "stream_options")


def _think(body: dict[str, Any]) -> bool:
    think = False
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in THINK_EFFORTS:
            raise bad("reasoning_effort", f"expected one of {', '.join(THINK_EFFORTS)}, got {json.dumps(effort)}")
        think = THINK_EFFORTS[effort]
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        kwargs = _object(kwargs, "chat_template_kwargs")
        _known(kwargs, {"enable_thinking"}, "chat_template_kwargs.")
        think = _type(kwargs, "enable_thinking", bool, think, "chat_template_kwargs")
    return think


def _model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", "expected a string")
    return model


# ---- typed fields -----------------------------------------------------------------------------------


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad(where, f"expected a JSON object, got {_kind(value)}")
    return value


def _known(body: dict[str, Any], allowed: set[str], prefix: str = "") -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(prefix + unknown[0], "unknown field (not supported by this server)")


def _type(body: dict[str, Any], name: str, kind: type, default: Any, where: str = "") -> Any:
    value = body.get(name, default)
    if value is None and default is None and name not in body:
        raise bad(_path(where, name), f"is required ({kind.__name__})")
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise bad(_path(where, name), f"expected {kind.__name__}, got {_kind(value)}")
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(name, f"expected a number, got {_kind(value)}")
    if value < low or value > high or (open_low and value == low):
        side = "(" if open_low else "["
        raise bad(name, f"{value} is out of range {side}{low:g}, {high:g}]")
    return float(value)


def _int(body: dict[str, Any], name: str, default: int, low: int | None, high: int | None) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"expected an integer, got {_kind(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad(name, f"{value} is out of range" + (f" [{low}, {high}]" if high is not None else f" (>= {low})"))
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _path(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


__all__ = ["ChatRequest", "CompletionRequest", "Limits", "RequestError", "parse_chat", "parse_completion"]
