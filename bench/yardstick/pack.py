"""Tokenize the corpus splits into flat uint16 token streams for training.

    python -m bench.yardstick.pack --tokenizer bench/yardstick/data/tokenizer-4096

Each document becomes ``<s> ... </s>`` and documents are concatenated, so training windows
cross document boundaries the way pre-training data usually does. Output: train.npy and
heldout.npy (uint16) plus a copy of the tokenizer, in one folder that can travel to a GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from bench.yardstick.common import CORPUS_DIR, DATA_DIR, read_jsonl

BATCH = 256


def encode_split(tok: Tokenizer, path: Path) -> np.ndarray:
    """Token ids of every document of a split, each wrapped in <s> ... </s>."""
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    rows = list(read_jsonl(path))
    out: list[np.ndarray] = []
    for start in range(0, len(rows), BATCH):
        texts = [r["text"] for r in rows[start : start + BATCH]]
        # The post-processor already prepends <s>; add_special_tokens=False keeps control here.
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            out.append(np.asarray([bos, *enc.ids, eos], dtype=np.uint16))
        print(f"\r  {path.name}: {min(start + BATCH, len(rows))}/{len(rows)} docs", end="", flush=True)
    print()
    return np.concatenate(out)


def main() -> None:
    """Tokenize both splits with one tokenizer."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json")
    ap.add_argument("--corpus", type=Path, default=CORPUS_DIR)
    ap.add_argument("--out", type=Path, default=None, help="default: data/tokens-<vocab>")
    args = ap.parse_args()
    tok = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    assert vocab <= 65536, "uint16 token ids"
    out = args.out or DATA_DIR / f"tokens-{vocab}"
    out.mkdir(parents=True, exist_ok=True)
    stats = {"vocab_size": vocab}
    for split in ("train", "heldout"):
        ids = encode_split(tok, args.corpus / f"{split}.jsonl")
        np.save(out / f"{split}.npy", ids)
        stats[f"{split}_tokens"] = int(ids.size)
    shutil.copytree(args.tokenizer, out / "tokenizer", dirs_exist_ok=True)
    shutil.copy2(args.corpus / "sources.json", out / "sources.json")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
