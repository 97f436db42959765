"""Measure a quantized checkpoint against its bf16 original: one evaluator for every contender."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from apertus_mlx.load import load_model, load_tokenizer, resolve
from quant_recipes.calibration import read_text, token_sequences
from quant_recipes.pipeline import LogitComparison, bits_per_weight

BATCH = 4  # sequences per forward pass


@dataclass
class Reference:
    """The original model and the held-out token windows every contender is judged on."""

    model: Any
    tokens: mx.array  # (sequences, length)
    parameters: int


def reference(source: Path, evaluation_text: Path, sequences: int, length: int) -> Reference:
    src = resolve(source)
    model = load_model(src)
    if model.model.norm.weight.dtype == mx.float32:
        model.set_dtype(mx.bfloat16)  # recipes start from bf16, so that is what they are compared with
    tokenizer = load_tokenizer(src)
    tokens = token_sequences(tokenizer, read_text(evaluation_text), sequences, length, what="evaluation")
    parameters = sum(a.size for _, a in tree_flatten(model.parameters()))
    return Reference(model, tokens, parameters)


def measure(path: Path, ref: Reference) -> dict[str, Any]:
    """Bits per weight, size on disk, and KL / top-1 / perplexity against the reference on its tokens."""
    model = load_model(path)
    comparison = LogitComparison()
    for i in range(0, ref.tokens.shape[0], BATCH):
        batch = ref.tokens[i : i + BATCH]
        comparison.update(ref.model(batch), model(batch), batch)
    return {
        "bits_per_weight": bits_per_weight(model, ref.parameters),
        "size_bytes": sum(f.stat().st_size for f in Path(path).glob("*.safetensors")),
        **comparison.result(),
    }
