"""NVFP4 checkpoints written in the two published layouts, and their dequantization by each format's own formula.

Written out here from the formats' descriptions, independent of MLX: E2M1 codes (sign in bit 3, magnitudes
0, 0.5, 1, 1.5, 2, 3, 4, 6) two per byte, the first in the low nibble; one E4M3 scale per 16 inputs; one float32
scale per tensor. ModelOpt: w = e2m1 · scale · weight_scale_2. compressed-tensors: w = e2m1 · scale /
weight_global_scale. torch writes the float8 tensors, so the files carry the real `F8_E4M3` dtype.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from checkpoints import LINEARS

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def e4m3_decode(b: np.ndarray) -> np.ndarray:
    """float64 values of float8 E4M3 (fn) bytes: bias 7, subnormals below exponent 1, 0x7f/0xff NaN."""
    b = b.astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 15, b & 7
    value = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7))
    return np.where((exp == 15) & (man == 7), np.nan, sign * value)


def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """Bytes of the nearest E4M3 values (torch's rounding), clamped to the largest finite one, 448."""
    return torch.from_numpy(np.clip(x, -448, 448).astype(np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def unpack(codes: np.ndarray) -> np.ndarray:
    """E2M1 values [out, in] of packed bytes [out, in/2], the low nibble first."""
    nibbles = np.stack([codes & 15, codes >> 4], axis=-1).reshape(codes.shape[0], -1)
    return E2M1[nibbles]


def dequantize(codes: np.ndarray, scales: np.ndarray, tensor_scale: float, inverted: bool = False) -> np.ndarray:
    """The format's weight in float64: e2m1 · scale · tensor_scale, or / tensor_scale when `inverted` (CT)."""
    block = np.repeat(e4m3_decode(scales), 16, axis=1)
    t = np.float64(tensor_scale)
    return unpack(codes) * block / t if inverted else unpack(codes) * block * t


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """ModelOpt's recipe: (codes, scale bytes, weight_scale_2) with scale_2 = amax / (6·448), nearest E2M1."""
    w = w.astype(np.float64)
    scale_2 = np.float32(np.abs(w).max() / (6 * 448))
    block_amax = np.abs(w).reshape(w.shape[0], -1, 16).max(-1)
    scales = e4m3_encode(np.where(block_amax > 0, block_amax / (6 * np.float64(scale_2)), 1.0))
    x = w / np.repeat(e4m3_decode(scales) * np.float64(scale_2), 16, axis=1)
    magnitude = np.abs(np.abs(x)[..., None] - E2M1[:8]).argmin(-1)
    nibbles = (magnitude | np.where(x < 0, 8, 0)).astype(np.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scales, scale_2


def write_modelopt(
    source: Path,
    out: Path,
    algo: str = "W4A16_NVFP4",
    exclude: tuple[str, ...] = ("lm_head", "model.embed_tokens"),
    input_scale: bool = False,
) -> dict[str, np.ndarray]:
    """`source` (a float checkpoint) in ModelOpt's layout; returns each quantized layer's weight by the formula."""
    tensors, refs = _copy(source, out), {}
    for name in _linears(tensors):
        codes, scales, scale_2 = quantize(tensors.pop(f"{name}.weight").float().numpy())
        tensors[f"{name}.weight"] = torch.from_numpy(codes)
        tensors[f"{name}.weight_scale"] = torch.from_numpy(scales).view(torch.float8_e4m3fn)
        tensors[f"{name}.weight_scale_2"] = torch.tensor(scale_2)
        if input_scale:
            tensors[f"{name}.input_scale"] = torch.tensor(0.01)
        refs[name] = dequantize(codes, scales, scale_2)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    producer = {"name": "modelopt", "version": "0.47.0"}
    quant = {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": list(exclude)}
    (out / "hf_quant_config.json").write_text(json.dumps({"producer": producer, "quantization": quant}, indent=4))
    weights = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    _set_quantization_config(
        out,
        {
            "config_groups": {"group_0": {"weights": weights, "targets": ["Linear"]}},
            "ignore": list(exclude),
            "quant_algo": algo,
            "producer": producer,
            "quant_method": "modelopt",
        },
    )
    return refs


def write_compressed_tensors(
    source: Path, out: Path, ignore: tuple[str, ...] = ("lm_head",), input_activations: bool = False
) -> dict[str, np.ndarray]:
    """`source` in compressed-tensors' `nvfp4-pack-quantized` layout, as llm-compressor's NVFP4A16 writes it."""
    tensors, refs = _copy(source, out), {}
    for name in _linears(tensors):
        codes, scales, scale_2 = quantize(tensors.pop(f"{name}.weight").float().numpy())
        global_scale = np.float32(1 / np.float64(scale_2))  # stored inverted
        tensors[f"{name}.weight_packed"] = torch.from_numpy(codes)
        tensors[f"{name}.weight_scale"] = torch.from_numpy(scales).view(torch.float8_e4m3fn)
        tensors[f"{name}.weight_global_scale"] = torch.tensor([global_scale])
        refs[name] = dequantize(codes, scales, global_scale, inverted=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    weights = {
        "dynamic": False,
        "group_size": 16,
        "num_bits": 4,
        "observer": "memoryless_minmax",
        "scale_dtype": "torch.float8_e4m3fn",
        "strategy": "tensor_group",
        "symmetric": True,
        "type": "float",
    }
    activations = dict(weights, dynamic="local") if input_activations else None
    group = {
        "format": "nvfp4-pack-quantized",
        "input_activations": activations,
        "output_activations": None,
        "targets": ["Linear"],
        "weights": weights,
    }
    _set_quantization_config(
        out,
        {
            "config_groups": {"group_0": group},
            "format": "nvfp4-pack-quantized",
            "ignore": list(ignore),
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "version": "0.20.1",
        },
    )
    return refs


def write_dequantized(source: Path, out: Path, refs: dict[str, np.ndarray]) -> Path:
    """`source` with each layer of `refs` replaced by its dequantized weight: the float model to compare with."""
    tensors = _copy(source, out)
    for name, w in refs.items():
        tensors[f"{name}.weight"] = torch.from_numpy(w).to(tensors[f"{name}.weight"].dtype)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _copy(source: Path, out: Path) -> dict[str, torch.Tensor]:
    shutil.copytree(source, out)
    return load_file(out / "model.safetensors")


def _linears(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(".weight") for k in tensors if k.endswith(tuple(f"{n}.weight" for n in LINEARS)))


def _set_quantization_config(out: Path, quant: dict) -> None:
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(config, indent=2))
