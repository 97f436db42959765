"""GPTQ (+ EoRA) checkpoints written in numpy in GPTQModel's published layout, and their independent dequantization.

Packing follows GPTQModel's description, written out here on its own: 2/4/8-bit codes fill int32 words from
the least significant bits; 3-bit codes fill three words per 32 codes in the pattern 10 | 1 | 10 | 1 | 10
(values straddling words are split across them). The reference weight is w = scale·(q − zero) per group.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """int32 [rows·bits/32, cols]: `codes` [rows, cols] packed down the rows."""
    rows, cols = codes.shape
    c = codes.astype(np.uint64)
    out = np.zeros((rows * bits // 32, cols), np.uint64)
    if bits == 3:
        for block in range(rows // 32):
            x, r = c[32 * block : 32 * block + 32], 3 * block
            out[r] = sum(x[i] << np.uint64(3 * i) for i in range(10)) | ((x[10] & np.uint64(3)) << np.uint64(30))
            out[r + 1] = (
                (x[10] >> np.uint64(2))
                | sum(x[11 + i] << np.uint64(3 * i + 1) for i in range(10))
                | ((x[21] & np.uint64(1)) << np.uint64(31))
            )
            out[r + 2] = (x[21] >> np.uint64(1)) | sum(x[22 + i] << np.uint64(3 * i + 2) for i in range(10))
    else:
        per_word = 32 // bits
        for i in range(rows):
            out[i // per_word] |= c[i] << np.uint64(bits * (i % per_word))
    return (out & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)


@dataclass
class Module:
    """One quantized module's published tensors and its reference weight [out, in] in float64."""

    bits: int
    group: int  # -1: one group over all inputs
    sym: bool
    codes: np.ndarray  # [in, out]
    zeros: np.ndarray  # [groups, out]
    scales: np.ndarray  # [groups, out] float16
    lora: tuple[np.ndarray, np.ndarray] | None = None  # A [r, in], B [out, r] float16

    def dequantized(self) -> np.ndarray:
        """scale·(q − zero), by the format's formula, without the adapter."""
        g = self.codes.shape[0] if self.group == -1 else self.group
        idx = np.arange(self.codes.shape[0]) // g
        s, z = self.scales.astype(np.float64)[idx], self.zeros.astype(np.float64)[idx]
        return (s * (self.codes - z)).T

    def effective(self) -> np.ndarray:
        """The weight the layer computes with: dequantized, plus the adapter's B·A."""
        w = self.dequantized()
        if self.lora is not None:
            a, b = self.lora
            w = w + b.astype(np.float64) @ a.astype(np.float64)
        return w


def quantize(w: np.ndarray, bits: int, group: int, sym: bool) -> Module:
    """Round-to-nearest in GPTQ's conventions: sym puts the zero at 2^(bits−1), asym at round(−min/scale)."""
    out_dims, in_dims = w.shape
    g = in_dims if group == -1 else group
    wg = w.reshape(out_dims, in_dims // g, g)
    maxq = 2**bits - 1
    if sym:
        scales = np.maximum(np.abs(wg).max(-1), 1e-8) * 2 / maxq
        zeros = np.full(scales.shape, (maxq + 1) // 2)
    else:
        lo, hi = np.minimum(wg.min(-1), 0), np.maximum(wg.max(-1), 0)
        scales = np.maximum(hi - lo, 1e-8) / maxq
        zeros = np.round(-lo / scales)
    scales = scales.astype(np.float16)
    s = scales.astype(np.float64)[..., None]
    codes = np.clip(np.round(wg / s) + zeros[..., None], 0, maxq).reshape(out_dims, in_dims)
    return Module(bits, group, sym, codes.T.astype(np.int64), zeros.T.astype(np.int64), scales.T.copy())


@dataclass
class Plan:
    """What to write: default settings, a `dynamic` map, and per module the settings it resolves to."""

    bits: int = 4
    group: int = 64
    sym: bool = True
    fmt: str = "gptq_v2"
    dynamic: dict[str, dict] = field(default_factory=dict)
    modules: dict[str, tuple[int, int, bool] | None] = field(default_factory=dict)  # None: left unquantized
    ranks: dict[str, int] = field(default_factory=dict)  # EoRA rank per module
    adapters: str | None = None  # "peft" (in a subfolder), "peft-root", "merged"
    float_dtype: str = "float32"


def write_gptq(source: Path, out: Path, plan: Plan, seed: int = 0) -> dict[str, Module]:
    """A GPTQ checkpoint of the float HF checkpoint `source`, and the quantized modules it holds."""
    rng = np.random.default_rng(seed)
    tensors = {k: v.float().numpy() for k, v in load_torch(str(source / "model.safetensors")).items()}
    written, modules, lora = {}, {}, {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        settings = plan.modules.get(module, "float")
        if settings == "float" or settings is None:
            written[name] = torch.from_numpy(t).to(getattr(torch, plan.float_dtype))
            continue
        bits, group, sym = settings
        m = quantize(t.astype(np.float64), bits, group, sym)
        stored_zeros = (m.zeros - 1) % 2**bits if plan.fmt == "gptq" else m.zeros
        in_dims = t.shape[1]
        g = in_dims if group == -1 else group
        published = {
            "qweight": pack_rows(m.codes, bits),
            "qzeros": pack_rows(stored_zeros.T, bits).T.copy(),
            "scales": m.scales,
            "g_idx": (np.arange(in_dims) // g).astype(np.int32),
        }
        written |= {f"{module}.{k}": torch.from_numpy(v) for k, v in published.items()}
        if rank := plan.ranks.get(module):
            a = (0.05 * rng.standard_normal((rank, in_dims))).astype(np.float16)
            b = (0.05 * rng.standard_normal((t.shape[0], rank))).astype(np.float16)
            m.lora = (a, b)
            lora[module] = (a, b)
        modules[module] = m

    out.mkdir(parents=True, exist_ok=True)
    if plan.adapters == "merged":
        for module, (a, b) in lora.items():
            # GPTQModel's merged buffers are laid out for x @ A @ B: A [in, r], B [r, out].
            written[f"{module}.lora_A"], written[f"{module}.lora_B"] = (
                torch.from_numpy(a.T.copy()),
                torch.from_numpy(b.T.copy()),
            )
    save_torch(written, str(out / "model.safetensors"), metadata={"format": "pt"})
    if lora and plan.adapters in ("peft", "peft-root"):
        _write_peft(out / "eora" if plan.adapters == "peft" else out, lora, plan)
    for extra in source.iterdir():
        if extra.name not in ("model.safetensors", "config.json"):
            shutil.copy(extra, out / extra.name)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "bits": plan.bits,
        "group_size": plan.group,
        "desc_act": False,
        "sym": plan.sym,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": plan.fmt,
        "pack_dtype": "int32",
        "dynamic": plan.dynamic,
        "meta": {"quantizer": ["gptqmodel:5.0.0"]},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return modules


def _write_peft(folder: Path, lora: dict[str, tuple[np.ndarray, np.ndarray]], plan: Plan) -> None:
    folder.mkdir(exist_ok=True)
    tensors = {}
    for module, (a, b) in lora.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    ranks = sorted(set(plan.ranks.values()))
    config = {
        "peft_type": "LORA",
        "r": ranks[0],
        "lora_alpha": 2 * ranks[0],  # ignored at inference: EoRA adds B·A unscaled
        "target_modules": sorted({m.rsplit(".", 1)[1] for m in lora}),
        "rank_pattern": {re.escape(m): r for m, r in plan.ranks.items() if r != ranks[0]},
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def float_checkpoint(gptq: Path, out: Path, modules: dict[str, Module]) -> Path:
    """A plain float checkpoint holding each module's effective weight (dequantized + B·A) in float32."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.float().numpy()
        for k, v in load_torch(str(gptq / "model.safetensors")).items()
        if v.is_floating_point() and not k.endswith((".scales", ".lora_A", ".lora_B"))
    }
    for module, m in modules.items():
        tensors[f"{module}.weight"] = np.ascontiguousarray(m.effective(), np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for extra in gptq.iterdir():
        if extra.is_file() and extra.name not in ("model.safetensors", "config.json"):
            shutil.copy(extra, out / extra.name)
    config = json.loads((gptq / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
