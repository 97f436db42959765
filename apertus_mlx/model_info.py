"""What a model directory holds, read from its files alone (no weights loaded): for pickers and status lines."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import formats
from .errors import ConfigError
from .load import DEMO_MODEL, load_config

_BYTES_PER_PARAMETER = {"bfloat16": 2, "float16": 2, "float32": 4}

# What "fits this Mac" means, for pickers and for the `budget` recipe's --ram-gb target alike.
USABLE_RAM = 0.66  # the share of a Mac's memory the GPU may wire by default
RUNTIME_OVERHEAD = 0.5e9  # activations, buffers, the app itself
FIT_CONTEXT = 8192  # the chat length a model must leave room for, in tokens of 16-bit KV cache


def fits_in_ram(weights_bytes: float, kv_bytes_per_token: float, ram_bytes: float, context: int = FIT_CONTEXT) -> bool:
    """Whether weights, a 16-bit KV cache of `context` tokens and the runtime's overhead fit the usable RAM."""
    return weights_bytes + kv_bytes_per_token * context + RUNTIME_OVERHEAD <= USABLE_RAM * ram_bytes


@dataclass(frozen=True)
class ModelInfo:
    """A model on disk: its name, how it is quantized, how long a context it takes and what it weighs."""

    name: str  # the repo id for a hub snapshot, else the directory's name
    path: Path
    quantization: str  # e.g. "BF16", "INT4 g64", "budget 4.21 bpw", "MXFP4"
    context_length: int
    weights_bytes: int  # the safetensors on disk
    kv_bytes_per_token: int  # keys and values of every layer, at 16 bits
    demo: bool = False  # the bundled demo model

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "quantization": self.quantization,
            "context_length": self.context_length,
            "weights_bytes": self.weights_bytes,
            "demo": self.demo,
        }

    def memory_bytes(self, context: int = 8192) -> int:
        """Weights plus a 16-bit KV cache of `context` tokens: what a chat of that length needs."""
        return self.weights_bytes + self.kv_bytes_per_token * context

    def fits(self, ram_bytes: float, context: int = FIT_CONTEXT) -> bool:
        """Whether a chat of `context` tokens fits a machine with `ram_bytes` of memory (see `fits_in_ram`)."""
        return fits_in_ram(self.weights_bytes, self.kv_bytes_per_token, ram_bytes, context)


def describe_model(path: str | os.PathLike, name: str | None = None) -> ModelInfo:
    """`ModelInfo` of a local model directory; raises `ModelNotFoundError` or `ConfigError` naming the file."""
    path = Path(path)
    fmt = formats.detect(path)
    config = formats.source_config(path, fmt) if fmt else load_config(path)
    demo = path.resolve() == DEMO_MODEL.resolve()
    # Apertus 1.5's full model keeps the decoder's settings in text_config.
    text = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    return ModelInfo(
        name=name or _hub_name(path) or ("demo model" if demo else path.name),
        path=path,
        quantization=formats.label(path, fmt) if fmt == "gguf" else quantization_label(config, path),
        context_length=int(text.get("max_position_embeddings", 65536)),
        weights_bytes=sum(f.stat().st_size for f in formats.weight_files(path)),
        kv_bytes_per_token=_kv_bytes_per_token(text),
        demo=demo,
    )


def quantization_label(config: dict[str, Any], path: Path | None = None) -> str:
    """How the weights are stored, as a person would say it: "BF16", "INT4 g64", "budget 4.21 bpw"."""
    published = config.get("quantization_config")
    method = published.get("quant_method") if isinstance(published, dict) else None
    if method == "gptq":
        return f"GPTQ INT{published.get('bits', '?')} g{published.get('group_size', '?')}"
    if method in ("modelopt", "compressed-tensors") or (path is not None and (path / "hf_quant_config.json").is_file()):
        return "NVFP4"  # the only published scheme of these tools we load (apertus_mlx.formats.nvfp4)
    recipe = config.get("quantization_recipe")
    if isinstance(recipe, dict) and recipe.get("name"):
        bpw = _report_bpw(path) if path is not None else None
        return f"{recipe['name']} {bpw:.2f} bpw" if bpw else str(recipe["name"])
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict) and "bits" in quant:
        mode = quant.get("mode", "affine")
        if mode != "affine":
            return mode.upper()
        bits = {quant["bits"]} | {v["bits"] for v in quant.values() if isinstance(v, dict) and "bits" in v}
        width = f"INT{quant['bits']}" if len(bits) == 1 else f"mixed {'/'.join(map(str, sorted(bits)))}-bit"
        return f"{width} g{quant.get('group_size', 64)}"
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    if dtype not in _BYTES_PER_PARAMETER:
        raise ConfigError(f"config.json: unknown dtype {dtype!r}")
    return {"bfloat16": "BF16", "float16": "FP16", "float32": "FP32"}[dtype]


def _report_bpw(path: Path) -> float | None:
    """Bits per weight from the quality report our converter writes next to the weights."""
    try:
        return float(json.loads((path / "quality.json").read_text(encoding="utf-8"))["bits_per_weight"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _kv_bytes_per_token(config: dict[str, Any]) -> int:
    heads = int(config.get("num_attention_heads", 1))
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size", 0)) // max(heads, 1))
    kv_heads = int(config.get("num_key_value_heads", heads))
    return 2 * 2 * int(config.get("num_hidden_layers", 0)) * kv_heads * head_dim


def _hub_name(path: Path) -> str | None:
    """`owner/name` for a Hugging Face cache snapshot (…/models--owner--name/snapshots/<commit>)."""
    parts = path.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--") :].replace("--", "/", 1)
    return None
