"""How a GGUF file's metadata and tensors map onto our model: config, names, xIELU, RoPE, dtypes, file type."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

from ..errors import CheckpointError, ConfigError
from ..model import Model, rope_periods
from .gguf_tensors import metadata

ARCH = "apertus"
# GGUF tensor name -> ours ({} is the layer number).
_LAYER = {
    "attn_norm": "attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "feedforward_layernorm",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_config(reader: GGUFReader, tensors: dict[str, Any], where: str) -> dict[str, Any]:
    """A Hugging Face style config dict for `ModelArgs.from_config`, from the GGUF metadata."""
    arch = metadata(reader, "general.architecture")
    if arch != ARCH:
        raise ConfigError(f"{where}: general.architecture is {arch!r}, expected {ARCH!r}")

    def key(name: str, default: Any = None) -> Any:
        value = metadata(reader, f"{ARCH}.{name}", default)
        if value is None:
            raise ConfigError(f"{where}: missing metadata key {ARCH}.{name}")
        return value

    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{where}: lacks tensor token_embd.weight")
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    vocab = int(tensors["token_embd.weight"].shape[1])  # ggml shapes list the fastest (input) dimension first
    config = {
        "model_type": "apertus",
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "vocab_size": vocab,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(key("context_length", 65536)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "rope_theta": float(key("rope.freq_base", 12_000_000.0)),
    }
    if "rope_freqs.weight" in tensors:
        factors = _factors(tensors, config["head_dim"], where)
        if scaling := llama3_scaling(factors, config["head_dim"], config["rope_theta"]):
            config["rope_scaling"] = scaling  # so the model, and an MLX checkpoint saved from it, need no rope_freqs
    return config


def llama3_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any] | None:
    """The llama3 RoPE parameters whose frequency divisors are `factors`, or None when no such parameters exist.

    llama.cpp stores llama3 scaling only as those divisors. They fix `factor` (the largest) and, through the
    smoothly interpolated band, `original / (high - low)` and `low / (high - low)`; any `original` then gives
    the same rotations, so the published 8192 is taken and the result checked against every divisor.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor = float(factors.max())
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if factor <= 1 or band.sum() < 2:
        return None
    # In the band 1 / f = (1 - s) / factor + s, with s linear in 1 / wavelength: s = a / wavelength + b.
    s = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    a, b = np.polyfit(inv_freq[band] / (2 * np.pi), s, 1)
    original = 8192
    low = -b * original / a
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(round(low, 6)),
        "high_freq_factor": float(round(low + original / a, 6)),
        "original_max_position_embeddings": original,
    }
    expected = np.asarray(rope_periods(head_dim, theta, None)) * factors
    rebuilt = np.asarray(rope_periods(head_dim, theta, scaling))
    return scaling if np.allclose(rebuilt, expected, rtol=1e-5) else None


def _factors(tensors: dict[str, Any], head_dim: int, where: str) -> np.ndarray:
    factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float32).reshape(-1)
    if factors.size != head_dim // 2:
        raise CheckpointError(f"{where}: rope_freqs.weight has {factors.size} values, expected {head_dim // 2}")
    return factors


def our_name(name: str, where: str) -> str:
    stem, _, suffix = name.rpartition(".")
    if suffix == "weight" and stem in _TOP:
        return f"{_TOP[stem]}.weight"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    raise CheckpointError(f"{where}: unexpected tensor {name} for an Apertus model")


def set_xielu(reader: GGUFReader, model: Model, weights: dict[str, mx.array], where: str) -> None:
    """xIELU's four per-layer scalars, raw (softplus applies at run time), from the un-prefixed xielu.* arrays."""
    layers = len(model.layers)
    for const in ("alpha_p", "alpha_n", "beta", "eps"):
        values = metadata(reader, f"xielu.{const}")
        if values is None or len(values) != layers:
            raise ConfigError(f"{where}: metadata xielu.{const} should hold {layers} values")
        for i, v in enumerate(values):
            weights[f"model.layers.{i}.mlp.act_fn.{const}"] = mx.array(float(v), dtype=mx.float32)


def match_embedding_dtype(weights: dict[str, mx.array]) -> mx.Dtype:
    """The float type the model computes in, given to the F32 norms and xIELU scalars that fit it exactly.

    A 16-bit float embedding gives its dtype; a quantized one bfloat16 (Apertus's own, and what its exact fp16 /
    fp32 scales would otherwise lift to float32); an F32 one float32. llama.cpp writes the small tensors as F32
    whatever the model's dtype; kept so, they would lift every activation and the KV cache to float32 too.
    """
    embedding = weights["model.embed_tokens.weight"]
    dtype = mx.bfloat16 if "model.embed_tokens.scales" in weights else embedding.dtype
    if dtype not in (mx.bfloat16, mx.float16):
        return dtype
    for name, w in weights.items():
        if w.ndim <= 1 and w.dtype == mx.float32 and mx.array_equal(w.astype(dtype).astype(mx.float32), w).item():
            weights[name] = w.astype(dtype)
    return dtype


def set_rope(model: Model, tensors: dict[str, Any], where: str) -> None:
    """RoPE scaling that is not llama3's (see `llama3_scaling`): `rope_freqs` divide each frequency, so they
    multiply our periods."""
    args = model.args
    if "rope_freqs.weight" not in tensors or args.rope_scaling is not None:
        return
    factors = _factors(tensors, args.head_dim, where)
    periods = rope_periods(args.head_dim, args.rope_theta, None) * mx.array(factors)
    for layer in model.layers:
        layer.self_attn._periods = periods


def file_type(reader: GGUFReader, tensors: dict[str, Any]) -> str:
    """The file's quant name (general.file_type), else the most common type among its 2-D tensors."""
    ftype = metadata(reader, "general.file_type")
    if ftype is not None:
        try:
            return LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").replace("ALL_", "")
        except ValueError:
            pass
    types = Counter(GGMLQuantizationType(t.tensor_type).name for t in tensors.values() if len(t.shape) > 1)
    return types.most_common(1)[0][0] if types else "?"
