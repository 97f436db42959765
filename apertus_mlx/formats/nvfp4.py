"""NVFP4 checkpoints as NVIDIA ModelOpt and compressed-tensors (llm-compressor) publish them, weight-only.

Per quantized linear layer of `out` rows and `in` inputs, both layouts store the E2M1 codes as uint8 [out, in/2]
(two per byte, the first in the low nibble), one float8 E4M3 scale per 16 inputs [out, in/16], and one float32
scale per tensor:

- ModelOpt (`hf_quant_config.json`): `weight`, `weight_scale`, `weight_scale_2`; w = e2m1 · scale · scale_2.
- compressed-tensors (`nvfp4-pack-quantized`): `weight_packed`, `weight_scale`, `weight_global_scale`, stored
  inverted: w = e2m1 · scale / global.

Read little-endian as uint32, the code bytes are MLX's `nvfp4` weight words (eight codes, first in the low bits)
and the E4M3 bytes its scales, so both are used as stored, memory-mapped. The tensor scale multiplies the
output (`ScaledQuantizedLinear`). Layers the checkpoint leaves in float (lm_head, embeddings) stay so.
W4A4 checkpoints (activations quantized too, with `input_scale`) are refused: this runtime is weight-only.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import CheckpointError, ConfigError
from ..load import _check_weights, _read_weights, load_config
from ..model import Model, ModelArgs
from ..scaled_linear import ScaledQuantizedLinear
from . import ImportSummary, read_json

MODELOPT_FILE = "hf_quant_config.json"
CT_FORMAT = "nvfp4-pack-quantized"
W4A4, W4A16 = "NVFP4", "W4A16_NVFP4"  # ModelOpt's quant_algo names; older exports say NVFP4 for both
QUANTIZED = "NVFP4 g16 E4M3 + tensor scale"
DTYPE_NAMES = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32"}
KV_SCALES = ("k_scale", "v_scale")  # FP8 KV-cache scales: the cache here stays in the activations' dtype


@dataclass(frozen=True)
class Layout:
    """Where a layout keeps a layer's tensors, and how its tensor scale reads."""

    label: str
    codes: str
    global_scale: str
    inverted: bool  # compressed-tensors stores 1 / tensor scale
    activation_scale: str  # present only when activations are quantized too (W4A4)
    config_file: str


MODELOPT = Layout("NVFP4 (ModelOpt, weight-only)", "weight", "weight_scale_2", False, "input_scale", MODELOPT_FILE)
COMPRESSED = Layout(
    "NVFP4 (compressed-tensors)", "weight_packed", "weight_global_scale", True, "input_global_scale", "config.json"
)


def matches(path: Path) -> bool:
    """A directory with ModelOpt's `hf_quant_config.json` (or its config.json form), or compressed-tensors NVFP4."""
    if not path.is_dir():
        return False
    if (path / MODELOPT_FILE).is_file():
        return True
    quant = (read_json(path / "config.json") or {}).get("quantization_config")
    if not isinstance(quant, dict):
        return False
    if quant.get("quant_method") == "modelopt":
        return True
    return quant.get("quant_method") == "compressed-tensors" and CT_FORMAT in _ct_formats(quant)


def load_model(path: Path, lazy: bool = False) -> tuple[Model, ImportSummary]:
    """Our `Model` with every NVFP4 layer of `path` in a `ScaledQuantizedLinear`, the rest as stored."""
    config = load_config(path)
    layout, algo_of = _scheme(path, config)
    config = {k: v for k, v in config.items() if k != "quantization_config"}  # a foreign scheme: not ours to keep
    model = Model(ModelArgs.from_config(config))
    weights, origin = _read_weights(path)
    dtypes = _stored_dtypes(path, origin)
    summary = ImportSummary(layout.label)

    layers, floats = {}, []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if f"{name}.{layout.codes}" in weights and f"{name}.weight_scale" in weights:
            layers[name] = _import_layer(name, module, weights, origin, dtypes, layout, algo_of(name), summary)
        else:
            floats.append(name)
    if not layers:
        raise CheckpointError(f"{path}: no NVFP4 tensors ({layout.codes}, weight_scale) in the weight files")
    model.update_modules(tree_unflatten(list(layers.items())))

    if dropped := [k for k in weights if k.rpartition(".")[2] in KV_SCALES]:
        for k in dropped:
            del weights[k]
        summary.notes.append(f"{len(dropped)} FP8 KV-cache scales ignored: the KV cache stays unquantized")
    weights = model.sanitize(weights)
    _check_weights(model, weights, origin)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())

    for name, array in tree_flatten(model.parameters()):
        summary.weight_bytes += array.nbytes
        if not name.endswith((".scales", ".tensor_scale")) and array.dtype in DTYPE_NAMES:
            summary.modules[DTYPE_NAMES[array.dtype]] += array.size
    if floats:
        shown = ", ".join(floats[:3]) + (f" and {len(floats) - 3} more" if len(floats) > 3 else "")
        summary.notes.append(f"linear layers left unquantized by the checkpoint: {shown}")
    if layout.inverted:
        summary.notes.append("tensor scale = 1 / weight_global_scale (compressed-tensors stores it inverted)")
    return model, summary


def load_tokenizer(path: Path) -> None:
    """NVFP4 repositories carry the usual Hugging Face tokenizer files."""
    return None


def _scheme(path: Path, config: dict[str, Any]) -> tuple[Layout, Callable[[str], str]]:
    """The layout, and each layer's ModelOpt quant_algo; refuses what is not weight-only NVFP4 in one line."""
    quant = config.get("quantization_config")
    if (path / MODELOPT_FILE).is_file() or (isinstance(quant, dict) and quant.get("quant_method") == "modelopt"):
        return MODELOPT, _modelopt_algos(path, quant)
    _check_ct(quant)
    return COMPRESSED, lambda name: W4A16


def _modelopt_algos(path: Path, quant: Any) -> Callable[[str], str]:
    """`name -> quant_algo` from `hf_quant_config.json` (or config.json's `quantization_config`), checked."""
    file = path / MODELOPT_FILE
    if file.is_file():
        data = read_json(file)
        if data is None or not isinstance(data.get("quantization"), dict):
            raise ConfigError(f"{file}: expected a JSON object with a 'quantization' object")
        settings, where = data["quantization"], file.name
    else:
        settings, where = quant, "config.json: quantization_config"
    algo = str(settings.get("quant_algo", "")).upper()
    per_layer = {
        name: str(entry.get("quant_algo", "")).upper()
        for name, entry in (settings.get("quantized_layers") or {}).items()
        if isinstance(entry, dict)
    }
    checked = per_layer.items() if algo == "MIXED_PRECISION" else [("", algo)]
    for name, layer_algo in checked:
        if layer_algo not in (W4A4, W4A16):
            key = f"quantized_layers.{name}.quant_algo" if name else "quant_algo"
            raise ConfigError(
                f"{where}: {key} {layer_algo or None!r} is not supported; NVFP4 ({W4A16}, or {W4A4} without "
                "input scales) is"
            )
    group = settings.get("group_size", 16)
    if group != 16:
        raise ConfigError(f"{where}: group_size {group} is not supported; NVFP4 uses 16")
    if algo == "MIXED_PRECISION":
        return lambda name: per_layer.get(name, W4A16)
    return lambda name: algo


def _check_ct(quant: dict[str, Any]) -> None:
    """Every config group of a compressed-tensors checkpoint must be NVFP4 weight-only, compressed."""
    where = "config.json: quantization_config"
    for name, group in (quant.get("config_groups") or {}).items():
        fmt = group.get("format") or quant.get("format")
        if fmt != CT_FORMAT:
            raise ConfigError(f"{where}.config_groups.{name}.format {fmt!r} is not supported; {CT_FORMAT!r} is")
        if group.get("input_activations"):
            raise ConfigError(
                f"{where}.config_groups.{name}.input_activations: a W4A4 NVFP4 checkpoint (activations quantized "
                "too); only weight-only NVFP4 (NVFP4A16) is supported"
            )
        w = group.get("weights") or {}
        if (w.get("num_bits"), w.get("type"), w.get("group_size"), w.get("symmetric", True)) != (4, "float", 16, True):
            raise ConfigError(f"{where}.config_groups.{name}.weights is not symmetric 4-bit float in groups of 16")
    if (status := quant.get("quantization_status", "compressed")) != "compressed":
        raise ConfigError(f"{where}.quantization_status {status!r} is not supported; 'compressed' is")


def _import_layer(
    name: str,
    linear: nn.Linear,
    weights: dict[str, mx.array],
    origin: dict[str, str],
    dtypes: dict[str, str],
    layout: Layout,
    algo: str,
    summary: ImportSummary,
) -> ScaledQuantizedLinear:
    """Move `name`'s NVFP4 tensors in `weights` to our layer's names, after checking dtypes and shapes."""
    codes_key, scale_key, global_key = (f"{name}.{t}" for t in (layout.codes, "weight_scale", layout.global_scale))
    file = origin.get(codes_key, "checkpoint")
    if (act_key := f"{name}.{layout.activation_scale}") in weights:
        if algo == W4A4 or layout.inverted:
            raise CheckpointError(
                f"{origin.get(act_key, file)}: tensor {act_key}: a W4A4 NVFP4 checkpoint (activations quantized "
                "too); only weight-only NVFP4 (NVFP4A16) is supported"
            )
        del weights[act_key]  # W4A16_NVFP4 exports may carry it; weight-only inference never reads it
    if f"{name}.weight_zero_point" in weights:
        raise CheckpointError(f"{file}: tensor {name}.weight_zero_point: asymmetric NVFP4 is not supported")
    if global_key not in weights:
        raise CheckpointError(f"{file}: {name} has {layout.codes} but no {layout.global_scale}")

    out_dims, in_dims = linear.weight.shape
    expected = {
        codes_key: ("U8", (out_dims, in_dims // 2)),
        scale_key: ("F8_E4M3", (out_dims, in_dims // 16)),
    }
    for key, (dtype, shape) in expected.items():
        if dtypes.get(key) != dtype:
            raise CheckpointError(f"{origin.get(key, file)}: tensor {key} is {dtypes.get(key)}, NVFP4 stores {dtype}")
        if tuple(weights[key].shape) != shape or in_dims % 16:
            raise CheckpointError(
                f"{origin.get(key, file)}: tensor {key} has shape {tuple(weights[key].shape)}, config.json implies "
                f"{shape} for NVFP4 (two codes per byte, one scale per 16 inputs)"
            )
    tensor_scale = weights.pop(global_key)
    if tensor_scale.size != 1 or not mx.issubdtype(tensor_scale.dtype, mx.floating):
        raise CheckpointError(
            f"{origin.get(global_key, file)}: tensor {global_key} should be one float, got "
            f"{tensor_scale.dtype} {tuple(tensor_scale.shape)}"
        )
    tensor_scale = tensor_scale.reshape(()).astype(mx.float32)
    if layout.inverted:
        tensor_scale = mx.reciprocal(tensor_scale)

    weights[f"{name}.weight"] = weights.pop(codes_key).view(mx.uint32)  # little-endian: byte 0 is the low byte
    weights[f"{name}.scales"] = weights.pop(scale_key)  # mx.load reads F8_E4M3 as its bytes, as nvfp4 wants
    weights[f"{name}.tensor_scale"] = tensor_scale
    summary.modules[QUANTIZED] += out_dims * in_dims
    return ScaledQuantizedLinear(in_dims, out_dims, bias="bias" in linear)


def _stored_dtypes(path: Path, origin: dict[str, str]) -> dict[str, str]:
    """Each tensor's dtype as the safetensors headers spell it: mx.load reads F8_E4M3 and U8 alike as uint8."""
    dtypes: dict[str, str] = {}
    for name in sorted(set(origin.values())):
        file = path / name
        try:
            with file.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"{file}: unreadable safetensors header ({e})") from None
        dtypes.update({k: v["dtype"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)})
    return dtypes


def _ct_formats(quant: dict[str, Any]) -> set[str]:
    groups = quant.get("config_groups") or {}
    return {quant.get("format")} | {g.get("format") for g in groups.values() if isinstance(g, dict)}
