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
    # Apertus-v1.1 0.5B and 4B: estimated (their config.json cannot be read here) so as to match the hub's parameter
    # counts (0.56 B, 3.8 B) and the KV cache bytes per token in tui/catalog.py (20,480 and 98,304), tied embeddings.
    "0.5b": (1024, 40, 4096, 16, 2, 131072, True),
    "4b": (3072, 48, 8192, 24, 4, 131072, True),
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


# Apertus 1.5 (transformers' `apertus1p5`): the decoder of an Apertus shape with 1.5's split vocabulary — text ids
# below `image_token_offset` (the head's rows), then the image codebook, then the audio codebook (the embedding's
# rows) — and a vision tokenizer. "8b": the published sizes (266,752 in, 131,272 out; the vision tokenizer of
# Apertus1p5VisionTokenizerConfig's defaults, 218 M parameters). "tiny": small enough for a CPU, for tests.
SHAPES_1P5 = {  # decoder shape, (text ids = head rows, image codebook, audio codebook), vision_config
    "8b": ("8b", (131_272, 131_072, 4_408), {}),
    "tiny": (
        "tiny",
        (8_448, 1_024, 4_096),  # transformers checks the audio range against its default codebook (4096)
        {
            "codebook_size": 1024,
            "embed_dim": 32,
            "latent_channels": 32,
            "base_channels": 32,
            "channel_multiplier": [1, 1, 2, 2, 4],
            "num_res_blocks": 1,
            "attn_resolutions": [16],
            "resolution": 256,
        },
    ),
}


def shape_config_1p5(shape: str, image_token_id: int) -> dict:
    """A full `apertus1p5` config.json of `shape` (see SHAPES_1P5); `image_token_id` is the tokenizer's <|image|>."""
    from apertus_mlx.vision import vision_config

    decoder, (text_ids, image_codes, audio_codes), vision = SHAPES_1P5[shape]
    text = shape_config(decoder)
    for key in ("architectures", "model_type", "transformers_version", "rope_scaling", "rope_theta"):
        text.pop(key, None)
    text.update(vocab_size=text_ids + image_codes + audio_codes, output_vocab_size=text_ids, tie_word_embeddings=False)
    vision = vision_config({**vision, "codebook_size": image_codes})
    return {
        "architectures": ["Apertus1p5ForConditionalGeneration"],
        "model_type": "apertus1p5",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": image_token_id,
        "image_token_offset": text_ids,
        "audio_token_offset": text_ids + image_codes,
        "tie_word_embeddings": False,
    }
