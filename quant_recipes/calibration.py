"""Calibration and evaluation text, cut into fixed-length token sequences."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from apertus_mlx.errors import ConfigError

# Written for this project in 20+ languages and a little code, so it can ship with it.
DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "multilingual.txt"


def default_texts() -> tuple[str, str]:
    """(calibration, evaluation): alternate paragraphs of the shipped text, so the two never overlap."""
    paragraphs = [p for p in DEFAULT_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return "\n\n".join(paragraphs[0::2]), "\n\n".join(paragraphs[1::2])


def read_text(path: str | Path) -> str:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"text file {file} does not exist")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not UTF-8 text") from None


def token_sequences(tokenizer: Any, text: str, count: int, length: int, what: str) -> mx.array:
    """Up to `count` non-overlapping windows of `length` tokens; shorter windows if the text is short."""
    tokens = tokenizer.encode(text)
    if len(tokens) < 16:
        raise ConfigError(f"{what} text has only {len(tokens)} tokens; give at least a paragraph")
    length = min(length, len(tokens))
    count = max(1, min(count, len(tokens) // length))
    return mx.array(tokens[: count * length]).reshape(count, length)
