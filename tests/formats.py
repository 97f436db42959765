"""Test tokenizers for the two chat formats: the project's own template and the published Apertus rules.

Checkpoints on the hub carry the published format's template; `tests/templates/published_rules.jinja` is the
project's own template that renders by the same rules, so the tests need neither the network nor that file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from checkpoints import CHAT_TEMPLATE, save_tokenizer

PUBLISHED_RULES = (Path(__file__).resolve().parent / "templates" / "published_rules.jinja").read_text()
TEMPLATES = {"project": CHAT_TEMPLATE, "published": PUBLISHED_RULES}


def save_published_tokenizer(path: Path) -> Any:
    """The tiny test tokenizer with the published-rules template instead of the project's."""
    return save_tokenizer(path, chat_template=PUBLISHED_RULES)


def load_test_tokenizer(path: Path, template: str = "project") -> Any:
    """Save the tiny tokenizer with the named template ("project" or "published") and load it as the app does."""
    from apertus_mlx import load_tokenizer

    save_tokenizer(path, chat_template=TEMPLATES[template])
    (path / "config.json").write_text('{"eos_token_id": 2}')
    return load_tokenizer(path)


def ids(tokenizer, *parts: str) -> list[int]:
    """Token ids of the parts; a part that is a special token becomes its single id."""
    out = []
    for part in parts:
        special = tokenizer.convert_tokens_to_ids(part)
        if part.startswith("<|") and special != tokenizer.unk_token_id:
            out.append(special)
        else:
            out += tokenizer.encode(part, add_special_tokens=False)
    return out
