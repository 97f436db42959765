"""The README's Apertus 1.5 memory table is what `bench.apertus1p5_fit` computes, from transformers' own shapes."""

from __future__ import annotations

import torch
from transformers import Apertus1p5TextConfig, Apertus1p5TextForCausalLM

from bench import apertus1p5_fit as fit

from checkpoints import REPO


def test_the_readme_table_is_the_computed_one():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Apertus 1.5") :]
    assert "\n".join(fit.rows()) in section


def test_the_parameter_count_is_transformers_for_the_8b():
    hidden, layers, mlp, heads, kv_heads = fit.SHAPES["8B"]
    config = Apertus1p5TextConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=mlp,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=fit.INPUT_VOCAB,
        output_vocab_size=fit.OUTPUT_VOCAB,
    )
    with torch.device("meta"):
        model = Apertus1p5TextForCausalLM(config)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert matrices == fit.parameters(*fit.SHAPES["8B"])
