"""Paths and tiny helpers shared by the yardstick scripts."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"
CORPUS_DIR = DATA_DIR / "corpus"
TOKENIZER_DIR = DATA_DIR / "tokenizer"
CACHE_DIR = Path(os.environ.get("YARDSTICK_CACHE", Path.home() / ".cache" / "apertus-mlx" / "yardstick"))

# One document in HELDOUT_MOD lands in the held-out split; the choice depends only on
# the document id, so it is stable across machines, runs and corpus rebuilds.
HELDOUT_MOD = 40


def is_heldout(doc_id: str) -> bool:
    """Deterministic held-out membership from a hash of the document id."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_MOD == 0


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines; return the number written."""
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> Iterator[dict]:
    """Yield rows of a JSON-lines file."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
