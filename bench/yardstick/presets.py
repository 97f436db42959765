"""Model and optimisation presets for the yardstick Apertus models."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import ApertusConfig

# Apertus' long-context RoPE: llama3 frequency scaling on a 12M base.
ROPE_PARAMETERS = {
    "rope_type": "llama3",
    "rope_theta": 12000000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 8192,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}


@dataclass(frozen=True)
class Preset:
    """Architecture plus the training hyper-parameters that go with it."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    tie_word_embeddings: bool
    seq_len: int
    batch_size: int
    lr: float
    warmup_steps: int
    time_budget_s: float
    max_epochs: float

    def config(self) -> ApertusConfig:
        """An ApertusConfig: xIELU MLP, QK-norm (built into the architecture), llama3 RoPE, GQA."""
        return ApertusConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_act="xielu",
            max_position_embeddings=65536,
            rope_parameters=dict(ROPE_PARAMETERS),
            rms_norm_eps=1e-5,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
            attention_bias=False,
            attention_dropout=0.0,
        )


PRESETS: dict[str, Preset] = {
    # Fits the 8 MB budget for a committed checkpoint and trains on two CPU cores in ~15 min.
    "nano": Preset(
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=768,
        tie_word_embeddings=True,
        seq_len=256,
        batch_size=16,
        lr=3e-3,
        warmup_steps=30,
        time_budget_s=780.0,
        max_epochs=4.0,
    ),
    # ~31M parameters; a few minutes on one H100.
    "small": Preset(
        vocab_size=8192,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=2048,
        tie_word_embeddings=False,
        seq_len=1024,
        batch_size=64,
        lr=1.5e-3,
        warmup_steps=150,
        time_budget_s=390.0,
        max_epochs=5.0,
    ),
}
