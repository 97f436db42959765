"""Write the README.md model card of a trained yardstick checkpoint."""

from __future__ import annotations

import json
from pathlib import Path


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


def write_card(out: Path, train: dict, results: dict) -> None:
    """Model card stating plainly that this is a demo model, with data, size and measurements."""
    cfg = json.loads((out / "config.json").read_text())
    src = json.loads((out / "sources.json").read_text())
    langs = ", ".join(sorted(src["characters_by_language"]))
    pkgs = "\n".join(
        f"| `{s['package']}` | {s['version']} | {s['language']} | {', '.join(s['licenses'])} |" for s in src["sources"]
    )
    sample_lines = "\n".join(f"| {s['prompt']} | {s['completion']!r} |" for s in results["samples"])
    card = f"""---
license: other
library_name: transformers
pipeline_tag: text-generation
tags: [apertus, demo, yardstick]
---

# Yardstick Apertus `{train["preset"]}`: a DEMO model

**This is a tiny demonstration model, not Apertus.** It has the Apertus architecture
(`ApertusForCausalLM`: xIELU MLP, QK-norm, llama3-scaled RoPE, grouped-query attention) but
was trained from scratch for a few minutes on {train["train_tokens"] / 1e6:.1f}M tokens of
Debian documentation. It writes language-shaped text and knows nothing useful. It exists so
that apertus-mlx can be built, tested and benchmarked offline. It was not instruction-tuned:
the chat template is present so the chat code paths can run, but replies are not meaningful.

## Size

| | |
|---|---|
| parameters | {train["parameters"] / 1e6:.2f}M |
| layers / hidden / MLP | {cfg["num_hidden_layers"]} / {cfg["hidden_size"]} / {cfg["intermediate_size"]} |
| heads (query / key-value) | {cfg["num_attention_heads"]} / {cfg["num_key_value_heads"]} |
| vocabulary | {cfg["vocab_size"]} (byte-level BPE) |
| tied embeddings | {cfg["tie_word_embeddings"]} |
| weights | bfloat16, {_size_mb(out):.1f} MB |

## Training

{train["steps"]} steps of {train["batch_size"]} x {train["seq_len"]} tokens
({train["tokens_seen"] / 1e6:.1f}M tokens, {train["epochs"]} epochs) on {train["device"]} in
{train["train_seconds"]:.0f} s; AdamW, peak learning rate {train["peak_lr"]}, cosine decay,
seed {train["seed"]}. Rebuild with the commands in `bench/yardstick/README.md` of apertus-mlx.

## Data

Text extracted from Debian packages (HTML documentation and man pages) in these languages:
{langs}. A fixed hash-based split of the documents is held out and never trained on.

| package | version | language | license |
|---|---|---|---|
{pkgs}

## Evaluation

Held-out perplexity over {results["heldout_tokens"]:,} tokens (windows of {results["eval_seq_len"]}):

| model | perplexity |
|---|---|
| this model | **{results["heldout_perplexity"]}** |
| unigram baseline | {results["unigram_perplexity"]} |
| uniform (random) | {results["uniform_perplexity"]} |

Greedy samples (40 new tokens):

| prompt | completion |
|---|---|
{sample_lines}
"""
    (out / "README.md").write_text(card, encoding="utf-8")
