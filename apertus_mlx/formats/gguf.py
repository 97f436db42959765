"""Placeholder: being written now (issue 19)."""

from __future__ import annotations

from pathlib import Path


def matches(path: Path) -> bool:
    return False


def load_model(path: Path, lazy: bool = False):
    raise NotImplementedError


def load_tokenizer(path: Path):
    return None
