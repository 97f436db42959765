"""Calibration and evaluation text files drawn from the yardstick corpus, for the quality benchmark.

Calibration text comes only from the train split and evaluation text only from the held-out split, so
no recipe is ever fitted (or tuned) on what it is judged by. Documents are interleaved across sources,
so that the first few thousand tokens, which is all a recipe's calibration reads, already span many
languages and both prose and manual pages.

    python -m bench.yardstick.samples --out bench/yardstick/data/samples
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from pathlib import Path

from bench.yardstick.common import CORPUS_DIR, DATA_DIR, read_jsonl

SEED = 1234


def interleaved(rows: list[dict], seed: int | None) -> list[dict]:
    """Round-robin over sources; within each, shuffled (seed) or in corpus order (None)."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_source[row["source"]].append(row)
    rng = random.Random(seed)
    queues = []
    for source in sorted(by_source):
        docs = by_source[source]
        if seed is not None:
            rng.shuffle(docs)
        queues.append(docs)
    out = []
    for i in range(max(len(q) for q in queues)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def take(rows: list[dict], chars: int) -> str:
    """Whole documents, in order, until `chars` characters are reached."""
    parts, total = [], 0
    for row in rows:
        if total >= chars:
            break
        parts.append(row["text"].strip())
        total += len(parts[-1])
    return "\n\n".join(parts) + "\n"


def write_samples(corpus: Path, out: Path, calibration_chars: int, evaluation_chars: int) -> tuple[Path, Path]:
    """Write `calibration.txt` (train split, shuffled with a fixed seed) and `evaluation.txt` (held-out)."""
    for split in ("train", "heldout"):
        if not (corpus / f"{split}.jsonl").is_file():
            raise SystemExit(f"{corpus / f'{split}.jsonl'} is missing: run `python -m bench.yardstick.corpus` first")
    out.mkdir(parents=True, exist_ok=True)
    calibration = take(interleaved(list(read_jsonl(corpus / "train.jsonl")), SEED), calibration_chars)
    evaluation = take(interleaved(list(read_jsonl(corpus / "heldout.jsonl")), None), evaluation_chars)
    paths = out / "calibration.txt", out / "evaluation.txt"
    for path, text in zip(paths, (calibration, evaluation), strict=True):
        path.write_text(text, encoding="utf-8")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=CORPUS_DIR)
    ap.add_argument("--out", type=Path, default=DATA_DIR / "samples")
    ap.add_argument("--calibration-chars", type=int, default=1_500_000)
    ap.add_argument("--evaluation-chars", type=int, default=300_000)
    args = ap.parse_args()
    for path in write_samples(args.corpus, args.out, args.calibration_chars, args.evaluation_chars):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
