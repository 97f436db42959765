"""Apertus 1.5 checkpoints (text path) on the Apertus decoder of `model.py`.

Apertus 1.5 keeps Apertus 1's decoder and changes what is around it:

- `model_type` "apertus1p5_text" is a text-only checkpoint laid out as Apertus 1 (`model.*`, `lm_head.weight`);
  "apertus1p5" is the full model: text settings under `text_config`, the decoder under
  `model.language_model.*`, a top-level `lm_head.weight`, and image/audio tokenizers under
  `model.vision_tokenizer.*` / `model.audio_tokenizer.*`, which the text path does not load.
- The vocabulary is split: the input embedding has `vocab_size` rows (text, visual and audio ids), the
  head only `output_vocab_size` (the text ids, a prefix of the vocabulary), so logits are that wide.
- RoPE defaults to llama3 scaling with theta 1.2e7, factor 8 and an original context of 8192.

This module maps those configs and tensor names onto `ModelArgs` and `Model`; it has no layers of its own.
"""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

from .errors import ConfigError

TEXT = "apertus1p5_text"
FULL = "apertus1p5"
MODEL_TYPES = (TEXT, FULL)
# Tensors of the full checkpoint that the text path leaves on disk (never read: weights are memory-mapped).
MEDIA_PREFIXES = ("model.vision_tokenizer.", "model.audio_tokenizer.")
# The reference's RoPE when a 1.5 config names none (Apertus1p5TextConfig's default).
DEFAULT_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 12_000_000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 8192,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}


def text_settings(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(the decoder's settings, the prefix that names their keys in errors) of a 1.5 `config.json`."""
    if config.get("model_type") == TEXT:
        text, where = dict(config), ""
    else:
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json: model_type 'apertus1p5' needs a text_config object, which is missing")
        text, where = dict(text), "text_config."
    if "rope_parameters" not in text and "rope_theta" not in text and "rope_scaling" not in text:
        text["rope_parameters"] = dict(DEFAULT_ROPE)
    return text, where


def head_rows(text: dict[str, Any], where: str) -> int:
    """Rows of the LM head: `output_vocab_size`, or all of `vocab_size` when it is unset (an unpruned head)."""
    vocab = text["vocab_size"]
    rows = text.get("output_vocab_size")
    if rows is None:
        return vocab
    if not isinstance(rows, int) or not 1 <= rows <= vocab:
        raise ConfigError(f"config.json: {where}output_vocab_size {rows!r} must be in 1..vocab_size ({vocab})")
    if rows < vocab and text.get("tie_word_embeddings", False):
        raise ConfigError(
            f"config.json: {where}tie_word_embeddings=true with output_vocab_size {rows} < vocab_size {vocab} "
            "is not supported (released checkpoints are untied)"
        )
    return rows


class MultimodalModel(nn.Module):
    """The reference's `Apertus1p5Model`, text part only: the decoder as `language_model`.

    `embed_tokens`, `layers` and `norm` reach through to the decoder, so code written for Apertus 1's
    `model.model` works on it; the tensor names keep the `language_model.` level.
    """

    def __init__(self, language_model: nn.Module):
        super().__init__()
        self.language_model = language_model

    def __call__(self, inputs: Any, cache: list[Any] | None) -> Any:
        return self.language_model(inputs, cache)

    @property
    def embed_tokens(self) -> nn.Module:
        return self.language_model.embed_tokens

    @property
    def layers(self) -> list[nn.Module]:
        return self.language_model.layers

    @property
    def norm(self) -> nn.Module:
        return self.language_model.norm


def checkpoint_config(config: dict[str, Any], args: Any) -> dict[str, Any]:
    """The config to save with a 1.5 model: the decoder's settings spelled out where the model type keeps them."""
    out = dict(config)
    text, _ = text_settings(out)
    text.update(
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        rms_norm_eps=args.rms_norm_eps,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=args.tie_word_embeddings,
        vocab_size=args.input_vocab_size,
        output_vocab_size=args.vocab_size,
    )
    if out.get("model_type") == TEXT:
        return text
    out["text_config"] = text
    return out
