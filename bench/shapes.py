"""Random-weight checkpoints in the published Apertus shapes, for benchmarks where values do not matter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx

import apertus_mlx
from apertus_mlx.model import Model, ModelArgs

SMALL = Path(__file__).resolve().parent / "yardstick" / "models" / "small"
SHAPES = {  # (hidden, layers, MLP, heads, kv heads, vocab, tied)
    "8b": (4096, 32, 21504, 32, 8, 131072, False),
    "1b": (2048, 16, 8192, 16, 8, 131072, True),
    "tiny": (256, 2, 512, 4, 2, 8192, False),  # for tests
}


def shape_config(shape: str) -> dict:
    """`small`'s config.json with the hyper-parameters of `shape`."""
    hidden, layers, mlp, heads, kv_heads, vocab, tied = SHAPES[shape]
    config = json.loads((SMALL / "config.json").read_text())
    config.update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=mlp,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        head_dim=hidden // heads,
    )
    return config


def random_model(shape: str) -> tuple[Model, dict]:
    """A bf16 model of `shape` with its initial (random) weights, not yet evaluated, and its config."""
    config = shape_config(shape)
    model = Model(ModelArgs.from_config(config))
    model.set_dtype(mx.bfloat16)
    return model, config


def save_layer_by_layer(model: Model, config: dict, out: Path, copy_from: Path = SMALL) -> Path:
    """Write `model` (with `copy_from`'s tokenizer and chat template), materialising one layer at a time."""
    for i, layer in enumerate(model.layers):  # random 8B is 32 GB in fp32: never all of it at once
        mx.eval(layer.parameters())
        print(f"weights: layer {i + 1}/{len(model.layers)}", file=sys.stderr, flush=True)
    print(f"writing the checkpoint to {out}", file=sys.stderr, flush=True)
    return apertus_mlx.save_model(out, model, config, copy_from=copy_from)
