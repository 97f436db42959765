"""GGUF files (llama.cpp's format) loaded as they are: metadata to our config, ggml blocks to MLX affine layers.

Groups of 32 (Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K) become `nn.QuantizedLinear` / `nn.QuantizedEmbedding` bit for
bit; Q6_K, Q3_K and Q2_K (groups of 16, which MLX's quantized matmul lacks) follow `APERTUS_GGUF_GROUP16`
(see `gguf_tensors`). F32/F16/BF16 tensors stay float in their own dtype.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

from ..errors import CheckpointError, ConfigError, ModelNotFoundError
from ..model import Model, ModelArgs, rope_periods
from . import ImportSummary
from .gguf_tensors import Converter, metadata

ARCH = "apertus"
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
# A quant tag in a file name: Q4_K_M, IQ4_XS, Q8_0, BF16, F16, F32, MXFP4 ...
_TAG = re.compile(r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Za-z0-9]+)*|BF16|F16|F32|MXFP4(?:_MOE)?)(?![A-Za-z0-9])", re.I)
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


def matches(path: Path) -> bool:
    """A `.gguf` file, or a directory of GGUF files without Hugging Face / MLX safetensors weights."""
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and any(path.glob("*.gguf")) and not any(path.glob("model*.safetensors"))


def pick(files: list[str], tag: str | None) -> str:
    """The one GGUF file of `files` for quant `tag` (case-insensitive, by file name), or the only file."""
    files = [f for f in files if not Path(f).name.lower().startswith("mmproj")]  # vision projectors, not models
    chosen = [f for f in files if tag.lower() in (t.lower() for t in _TAG.findall(Path(f).name))] if tag else files
    if len(chosen) > 1 and all(_SPLIT.search(f) for f in chosen):
        raise ModelNotFoundError(f"{Path(chosen[0]).name} is split into {len(chosen)} files, which is not supported")
    if len(chosen) == 1:
        return chosen[0]
    tags = sorted({t.upper() for f in files for t in _TAG.findall(Path(f).name)})
    problem = f"no GGUF file for :{tag}" if tag else f"{len(chosen)} GGUF files"
    raise ModelNotFoundError(f"{problem}; pick one with repo:TAG, tags here: {', '.join(tags) or 'none'}")


def gguf_file(path: Path) -> Path:
    """The GGUF file `path` names: itself, or the only one in a directory (several are refused by name)."""
    if path.is_file():
        if (m := _SPLIT.search(path.name)) and m.group(2) != "00001":
            raise CheckpointError(f"{path.name}: split GGUF files are not supported; merge them first")
        return path
    names = sorted(p.name for p in path.glob("*.gguf"))
    if len(names) > 1:
        raise ModelNotFoundError(f"{path}: several GGUF files ({', '.join(names)}); pass the one to load")
    return path / names[0]


def open_reader(file: Path) -> GGUFReader:
    """gguf-py's memory-mapped reader, with unreadable and split files refused in one line."""
    try:
        reader = GGUFReader(file)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise CheckpointError(f"{file.name}: truncated or not a GGUF file ({_first_line(e)})") from None
    if int(metadata(reader, "split.count", 1)) > 1:
        raise CheckpointError(f"{file.name}: split GGUF files are not supported; merge them first")
    return reader


def load_model(path: Path, lazy: bool = False) -> tuple[Model, ImportSummary]:
    """Our `Model` from a GGUF file (or a directory holding one), with its summary."""
    file = gguf_file(path)
    reader = open_reader(file)
    tensors = {t.name: t for t in reader.tensors}
    model = Model(ModelArgs.from_config(gguf_config(reader, tensors, file.name)))
    convert = Converter(file.name)
    weights: dict[str, mx.array] = {}
    quant: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name == "rope_freqs.weight":
            continue
        ours = _our_name(name, file.name)
        arrays, settings = convert(tensor)
        module = ours.rsplit(".", 1)[0]
        weights.update({f"{module}.{k}": v for k, v in arrays.items()})
        if settings:
            quant[module] = settings
    nn.quantize(model, class_predicate=lambda p, m: quant.get(p, False))
    _set_xielu(reader, model, weights, file.name)
    _match_embedding_dtype(weights)
    expected = {k for k, _ in nn.utils.tree_flatten(model.parameters())}
    if missing := sorted(expected - weights.keys()):
        raise CheckpointError(f"{file.name}: lacks the tensor for {missing[0]}")
    model.load_weights(list(weights.items()), strict=True)
    _set_rope(model, tensors, file.name)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    summary = ImportSummary(
        format=f"GGUF {_file_type(reader, tensors)}",
        modules=convert.modules,
        weight_bytes=sum(v.nbytes for v in weights.values()),
        notes=convert.notes(),
    )
    return model, summary


def load_tokenizer(path: Path):
    """The tokenizer and chat template the GGUF file's metadata carries."""
    from .gguf_tokenizer import build

    file = gguf_file(path)
    return build(open_reader(file), file.name)


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
    return {
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


def _our_name(name: str, where: str) -> str:
    stem, _, suffix = name.rpartition(".")
    if suffix == "weight" and stem in _TOP:
        return f"{_TOP[stem]}.weight"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    raise CheckpointError(f"{where}: unexpected tensor {name} for an Apertus model")


def _set_xielu(reader: GGUFReader, model: Model, weights: dict[str, mx.array], where: str) -> None:
    """xIELU's four per-layer scalars, raw (softplus applies at run time), from the un-prefixed xielu.* arrays."""
    layers = len(model.layers)
    for const in ("alpha_p", "alpha_n", "beta", "eps"):
        values = metadata(reader, f"xielu.{const}")
        if values is None or len(values) != layers:
            raise ConfigError(f"{where}: metadata xielu.{const} should hold {layers} values")
        for i, v in enumerate(values):
            weights[f"model.layers.{i}.mlp.act_fn.{const}"] = mx.array(float(v), dtype=mx.float32)


def _match_embedding_dtype(weights: dict[str, mx.array]) -> None:
    """With a 16-bit float embedding, F32 norms and xIELU scalars that fit it exactly take its dtype.

    llama.cpp writes these small tensors as F32 whatever the model's dtype; kept so, they would lift every
    activation (and the KV cache) of a BF16 file to float32. Cast, a BF16 GGUF runs as its BF16 source does.
    """
    dtype = weights["model.embed_tokens.weight"].dtype
    if dtype not in (mx.bfloat16, mx.float16) or "model.embed_tokens.scales" in weights:
        return
    for name, w in weights.items():
        if w.ndim <= 1 and w.dtype == mx.float32 and mx.array_equal(w.astype(dtype).astype(mx.float32), w).item():
            weights[name] = w.astype(dtype)


def _set_rope(model: Model, tensors: dict[str, Any], where: str) -> None:
    """llama3 RoPE scaling: `rope_freqs` holds factors that divide each frequency, so they multiply our periods."""
    tensor = tensors.get("rope_freqs.weight")
    if tensor is None:
        return
    args = model.args
    factors = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    if factors.size != args.head_dim // 2:
        raise CheckpointError(f"{where}: rope_freqs.weight has {factors.size} values, expected {args.head_dim // 2}")
    periods = rope_periods(args.head_dim, args.rope_theta, None) * mx.array(factors)
    for layer in model.layers:
        layer.self_attn._periods = periods


def _file_type(reader: GGUFReader, tensors: dict[str, Any]) -> str:
    """The file's quant name (general.file_type), else the most common type among its 2-D tensors."""
    ftype = metadata(reader, "general.file_type")
    if ftype is not None:
        try:
            return LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").replace("ALL_", "")
        except ValueError:
            pass
    types = Counter(GGMLQuantizationType(t.tensor_type).name for t in tensors.values() if len(t.shape) > 1)
    return types.most_common(1)[0][0] if types else "?"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
