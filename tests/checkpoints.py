"""Small random Apertus checkpoints written by transformers itself, the reference implementation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import ApertusConfig, ApertusForCausalLM

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 12_000_000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 8192,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}


def make_reference(
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 160,
    vocab: int = 256,
    tie: bool = False,
    seed: int = 0,
    **config_overrides,
) -> ApertusForCausalLM:
    """A float32 `ApertusForCausalLM` whose every parameter, norms and xIELU scalars included, is random."""
    torch.manual_seed(seed)
    config = ApertusConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tie,
        rope_parameters=dict(LLAMA3_ROPE),
        **config_overrides,
    )
    model = ApertusForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "act_fn" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def save_reference(model: ApertusForCausalLM, path: Path, schema: str = "v5", dtype: torch.dtype | None = None) -> Path:
    """`save_pretrained`, then optionally rewrite config.json in the transformers 4.56-4.x schema."""
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    if dtype is not None:
        model.float()
    if schema == "v4":
        to_v4_schema(path / "config.json")
    return path


def to_v4_schema(config_file: Path) -> None:
    """Rewrite as checkpoints from transformers 4.56-4.x are: rope_theta + rope_scaling, explicit flags."""
    config = json.loads(config_file.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config.update(qk_norm=True, post_norm=False, mlp_bias=False, transformers_version="4.56.2")
    config_file.write_text(json.dumps(config, indent=2))


def reference_logits(model: ApertusForCausalLM, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


def max_rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
