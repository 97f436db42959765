"""A chat as a Markdown document: what "export" writes."""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from .store import ChatRecord


def chat_markdown(record: ChatRecord) -> str:
    """The chat as Markdown: a heading, then each message under its role; reasoning and tools kept apart."""
    lines = [f"# {record.title}", ""]
    when = datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M")
    lines += [f"*{when}" + (f" · {record.model}*" if record.model else "*"), ""]
    if record.system:
        lines += ["## System", "", record.system, ""]
    for message in record.messages:
        lines += _message(message)
    return "\n".join(lines).rstrip() + "\n"


def _message(message: dict[str, Any]) -> list[str]:
    role = message.get("role", "")
    out = [f"## {role.capitalize() or 'Message'}", ""]
    reasoning = message.get("reasoning_content")
    if reasoning:
        out += ["<details><summary>Deliberation</summary>", "", reasoning, "", "</details>", ""]
    content = message.get("content")
    if content:
        out += [content if isinstance(content, str) else json.dumps(content, ensure_ascii=False), ""]
    for call in message.get("tool_calls") or []:
        function = call.get("function", call)
        arguments = function.get("arguments", "")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False, indent=2)
        out += [f"**Tool call** `{function.get('name', '?')}`", "", "```json", arguments, "```", ""]
    return out


def export_path(directory: Path, record: ChatRecord) -> Path:
    """A file name for the chat in `directory` that does not overwrite an earlier export."""
    slug = re.sub(r"[^\w-]+", "-", record.title.lower()).strip("-")[:48] or f"chat-{record.id}"
    path = directory / f"{slug}.md"
    n = 2
    while path.exists():
        path, n = directory / f"{slug}-{n}.md", n + 1
    return path


def write_atomically(path: Path, text: str) -> Path:
    """Write `text` to `path` so that the file is either the old one or complete, never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
