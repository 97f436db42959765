"""Evaluate a saved yardstick checkpoint: held-out perplexity and greedy samples.

    python -m bench.yardstick.evaluate apertus_mlx/demo_model --data bench/yardstick/data/tokens-4096

Loads the folder through the generic Auto* classes, so a pass also proves the checkpoint
is a loadable Hugging Face Apertus.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The Debian package manager",
    "Python is a programming language that",
    "Die Konfigurationsdatei",
    "La commande",
    "El sistema de archivos",
    "Il comando",
    "このコマンドは",
]


def unigram_perplexity(train: np.ndarray, held: np.ndarray, vocab: int) -> float:
    """Perplexity of an add-one unigram model: the bar a real language model must clear."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[held].mean()))


@torch.no_grad()
def heldout_perplexity(model: torch.nn.Module, held: np.ndarray, seq_len: int, device: str, bs: int = 16) -> float:
    """exp(mean next-token loss) over non-overlapping windows covering the held-out stream."""
    n = held.size // seq_len
    x = torch.from_numpy(held[: n * seq_len].astype(np.int64).reshape(n, seq_len))
    total, count = 0.0, 0
    for i, chunk in enumerate(x.split(bs)):
        chunk = chunk.to(device)
        logits = model(input_ids=chunk).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += chunk[:, 1:].numel()
        if i % 20 == 0:
            print(f"\r  held-out: {min((i + 1) * bs, n)}/{n} windows", end="", flush=True)
    print()
    return math.exp(total / count)


@torch.no_grad()
def samples(model: torch.nn.Module, tok, device: str, max_new_tokens: int = 40) -> list[dict]:
    """Greedy continuations of a few multilingual prompts."""
    out = []
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt").to(device)
        ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
        text = tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        out.append({"prompt": prompt, "completion": text})
    return out


def evaluate(model_dir: Path, data: Path, device: str, seq_len: int) -> dict:
    """Held-out perplexity (model, unigram and uniform baselines) and greedy samples."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    held = np.load(data / "heldout.npy")
    train = np.load(data / "train.npy", mmap_mode="r")
    vocab = model.config.vocab_size
    return {
        "heldout_tokens": int(held.size),
        "eval_seq_len": seq_len,
        "heldout_perplexity": round(heldout_perplexity(model, held, seq_len, device), 2),
        "unigram_perplexity": round(unigram_perplexity(np.asarray(train), held, vocab), 1),
        "uniform_perplexity": vocab,
        "samples": samples(model, tok, device),
    }


def main() -> None:
    """Evaluate a checkpoint folder and print the results as JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="folder from pack.py")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    print(json.dumps(evaluate(args.model_dir, args.data, args.device, args.seq_len), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
