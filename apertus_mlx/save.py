"""Write a model as an MLX checkpoint that both our loader and mlx-lm read, atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import apertus1p5
from .errors import ApertusError
from .load import _read_weights
from .model import Model

# Files that travel with the weights: tokenizer, chat template, generation defaults, image preprocessing (1.5).
_COMPANION_FILES = (
    "*.jinja",
    "tokenizer*",
    "special_tokens_map.json",
    "generation_config.json",
    "*.txt",
    "processor_config.json",
    "preprocessor_config.json",
)
_SHARD_BYTES = 5 << 30


def quantization_block(model: nn.Module) -> dict[str, Any] | None:
    """mlx-lm's `quantization` config: the commonest (group_size, bits, mode), plus each layer that differs.

    A layer type of our own (a low-rank side path, a tensor scale) writes its entry itself (`quant_params()`),
    with the keys `load` needs to rebuild it, always per layer: the common entry holds only the three settings.
    """
    layers = {
        path: _quant_params(m)
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    if not layers:
        return None
    keys = ("group_size", "bits", "mode")
    common = dict(Counter(tuple((k, p[k]) for k in keys) for p in layers.values()).most_common(1)[0][0])
    return {**common, **{path: p for path, p in layers.items() if p != common}}


def _quant_params(layer: nn.Module) -> dict[str, Any]:
    if hasattr(layer, "quant_params"):
        return layer.quant_params()
    return {"group_size": layer.group_size, "bits": layer.bits, "mode": layer.mode}


def checkpoint_config(model: Model, config: dict[str, Any]) -> dict[str, Any]:
    """`config` with the hyper-parameters spelled in both schemas, so mlx-lm's Apertus port reads it too.

    An Apertus 1.5 config keeps its own layout (the decoder's settings under `text_config` for the full model).
    """
    args = model.args
    if args.model_type in apertus1p5.MODEL_TYPES:
        out = apertus1p5.checkpoint_config(config, args)
    else:
        out = dict(config)
        out.update(
            rope_theta=args.rope_theta,
            rope_scaling=args.rope_scaling,
            qk_norm=args.qk_norm,
            post_norm=False,
            mlp_bias=args.mlp_bias,
            attention_bias=args.attention_bias,
            num_key_value_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            rms_norm_eps=args.rms_norm_eps,
            max_position_embeddings=args.max_position_embeddings,
            tie_word_embeddings=args.tie_word_embeddings,
        )
    for key in ("quantization", "quantization_config"):
        out.pop(key, None)
    if (quant := quantization_block(model)) is not None:
        out["quantization"] = quant
        out["quantization_config"] = quant  # the key Hugging Face tooling looks for
    return out


def save_model(
    out_dir: str | os.PathLike,
    model: Model,
    config: dict[str, Any],
    copy_from: str | os.PathLike | None = None,
    overwrite: bool = False,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Save weights (safetensors shards), `config.json` and the tokenizer files found in `copy_from`.

    A full Apertus 1.5 model (`model_type` "apertus1p5") also gets `copy_from`'s image and audio tokenizers'
    tensors (`model.vision_tokenizer.*`, `model.audio_tokenizer.*`) unchanged, as the text model never holds
    them, and its processor configs, so the saved checkpoint still reads images.

    The directory appears complete or not at all: everything is written to a sibling temporary
    directory that is renamed into place at the end. `before_commit(tmp_dir)` may add files to it.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite:
        raise ApertusError(f"{out} already exists; choose another output directory or allow overwriting")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        weights = dict(tree_flatten(model.parameters()))
        if copy_from is not None and model.args.model_type == apertus1p5.FULL:
            weights.update(_media_tensors(Path(copy_from)))
        _write_weights(tmp, weights)
        (tmp / "config.json").write_text(json.dumps(checkpoint_config(model, config), indent=2) + "\n")
        if copy_from is not None:
            for pattern in _COMPANION_FILES:
                for file in Path(copy_from).glob(pattern):
                    if file.is_file():
                        shutil.copy2(file, tmp / file.name)
        if before_commit is not None:
            before_commit(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _media_tensors(source: Path) -> dict[str, mx.array]:
    """The checkpoint's image and audio tokenizers' tensors, as stored (memory-mapped: only these are read)."""
    weights, _ = _read_weights(source)
    return {name: w for name, w in weights.items() if name.startswith(apertus1p5.MEDIA_PREFIXES)}


def _write_weights(directory: Path, weights: dict[str, mx.array]) -> None:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name, w in weights.items():
        if size + w.nbytes > _SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    if len(shards) == 1:
        mx.save_safetensors(str(directory / "model.safetensors"), shards[0], metadata={"format": "mlx"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(directory / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
