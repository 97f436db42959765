"""GPTQ contenders: the source quantized by GPTQModel itself, and in its layout by our own writer (with adapters).

GPTQModel 7.7 (a PyPI sdist) builds and quantizes on the CPU here, but pins its own torch and transformers; so
it runs in an environment of its own: set `GPTQMODEL_PYTHON` to that interpreter (a venv with
`pip install gptqmodel --no-build-isolation`, `GPTQMODEL_CPU_WORKERS=2` on a two-core machine). It writes the
`gptq` (v1) layout: INT4 g128 sym, calibrated on `CALIBRATION` windows.

Our writer (always run, labelled so) is round-to-nearest in GPTQ's conventions (sym: zero at 2^(bits−1), scale =
2·max|w|/(2^bits − 1)), not GPTQ's error-compensating solver, in the `gptq_v2` layout. Its low-rank adapters are
the best rank-r approximation of each weight's quantization error (EoRA weights that SVD by the calibration
activations; this one is data-free). The mixed contender follows TevunahAi's published recipe for Apertus 8B
scaled to the source: INT8 attention and first/last layers, INT4 MLPs, adapters of rank hidden/32 (hidden/2 in
the first and last layers), BF16 embeddings and head.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
GROUP = 128
REPO = Path(__file__).resolve().parents[2]
# Calibration for GPTQModel: the yardstick's calibration split when made, else the README (disjoint from eval text).
SAMPLES = REPO / "bench" / "yardstick" / "data" / "samples" / "calibration.txt"
CALIBRATION = 32  # windows of ~150 words


def contenders(source: Path, scratch: Path) -> list[tuple[str, Path]]:
    """(label, checkpoint) for INT4 and INT8 g128 RTN and the TevunahAi-style mix with adapters."""
    config = json.loads((source / "config.json").read_text())
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    last = layers - 1
    mixed = {
        rf"+:model\.layers\.({0}|{last})\.": {"bits": 8},
        r"+:model\.layers\.\d+\.self_attn\.": {"bits": 8},
    }

    def rank(module: str) -> int:
        return hidden // 2 if re.match(rf"model\.layers\.({0}|{last})\.", module) else hidden // 32

    made = []
    if python := os.environ.get("GPTQMODEL_PYTHON"):
        out = scratch / "gptqmodel"
        subprocess.run([python, "-m", "bench.formats.gptq", str(source), str(out)], check=True, cwd=REPO)
        made.append(("gptq/GPTQModel 7.7 INT4 g128 sym (gptq layout)", out))
    for label, name, bits, dynamic, ranks in (
        ("INT4 g128 sym", "int4", 4, {}, None),
        ("INT8 g128 sym", "int8", 8, {}, None),
        ("mixed INT8/INT4 g128 (TevunahAi's recipe)", "mixed", 4, mixed, None),
        ("mixed INT8/INT4 g128 (TevunahAi's recipe) + SVD adapters", "mixed-eora", 4, mixed, rank),
    ):
        out = scratch / name
        write(source, out, bits, dynamic, ranks)
        made.append((f"gptq/{label} (our RTN writer, gptq_v2 layout)", out))
    return made


def write(source: Path, out: Path, bits: int, dynamic: dict[str, dict], rank=None) -> None:
    """Every decoder linear of `source` quantized in GPTQ's layout; `rank(module)` adds a PEFT adapter there."""
    out.mkdir(parents=True)
    tensors, adapters = {}, {}
    for name, w in load_file(str(source / "model.safetensors")).items():
        module = name.removesuffix(".weight")
        if not name.endswith("_proj.weight"):  # embeddings, head, norms and xIELU stay as they are (BF16)
            tensors[name] = w
            continue
        module_bits = next((o["bits"] for p, o in dynamic.items() if re.match(p[2:], module)), bits)
        weight = w.double().numpy()
        qweight, qzeros, scales, dequantized = _quantize(weight, module_bits)
        tensors |= {
            f"{module}.qweight": qweight,
            f"{module}.qzeros": qzeros,
            f"{module}.scales": scales,
            f"{module}.g_idx": torch.arange(weight.shape[1], dtype=torch.int32) // GROUP,
        }
        if rank is not None:
            b, a = _low_rank(weight - dequantized, rank(module))
            adapters[f"base_model.model.{module}.lora_A.weight"] = torch.from_numpy(a).to(torch.float16)
            adapters[f"base_model.model.{module}.lora_B.weight"] = torch.from_numpy(b).to(torch.float16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if adapters:
        (out / "eora").mkdir()
        save_file(adapters, str(out / "eora" / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "eora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank("")}))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq_v2",
        "bits": bits,
        "group_size": GROUP,
        "sym": True,
        "desc_act": False,
        "dynamic": dynamic,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for pattern in TOKENIZER_FILES:
        for file in source.glob(pattern):
            shutil.copy(file, out / file.name)


def _quantize(w: np.ndarray, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """GPTQ's (qweight, qzeros, scales) for symmetric RTN of `w` [out, in], and the weight they encode."""
    out_dims, in_dims = w.shape
    maxq = 2**bits - 1
    groups = w.reshape(out_dims, in_dims // GROUP, GROUP)
    scales = (np.maximum(np.abs(groups).max(-1), 1e-10) * 2 / maxq).astype(np.float16)
    zero = (maxq + 1) // 2
    s = scales.astype(np.float64)[..., None]
    codes = np.clip(np.round(groups / s) + zero, 0, maxq).astype(np.uint32)
    dequantized = (s * (codes.astype(np.float64) - zero)).reshape(out_dims, in_dims)
    codes = codes.reshape(out_dims, in_dims)
    zeros = np.full((in_dims // GROUP, out_dims), zero, np.uint32)
    return (
        torch.from_numpy(_pack(codes.T, bits)),
        torch.from_numpy(_pack(zeros.T, bits).T.copy()),
        torch.from_numpy(scales.T.copy()),
        dequantized,
    )


def _low_rank(e: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(B [out, r], A [r, in]) with B·A the best rank-r approximation of `e`, from the smaller Gram matrix."""
    if e.shape[0] >= e.shape[1]:
        v = np.linalg.eigh(e.T @ e)[1][:, ::-1][:, :rank]  # top right singular vectors
        return np.ascontiguousarray(e @ v), np.ascontiguousarray(v.T)
    u = np.linalg.eigh(e @ e.T)[1][:, ::-1][:, :rank]
    return np.ascontiguousarray(u), np.ascontiguousarray(u.T @ e)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """int32 [rows·bits/32, cols]: 2/4/8-bit `codes` [rows, cols] packed down the rows, low bits first."""
    per_word = 32 // bits
    rows = codes.reshape(-1, per_word, codes.shape[1]).astype(np.uint32)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, :, None]
    return np.ascontiguousarray(np.bitwise_or.reduce(rows << shifts, axis=1)).view(np.int32)


def _run_gptqmodel(source: Path, out: Path) -> None:
    """INT4 g128 sym by GPTQModel on the CPU; run in GPTQModel's own environment (see the module docstring)."""
    from gptqmodel import GPTQModel, QuantizeConfig

    text = (SAMPLES if SAMPLES.is_file() else REPO / "README.md").read_text(encoding="utf-8").split()
    windows = [" ".join(text[i : i + 150]) for i in range(0, 150 * CALIBRATION, 150)]
    config = QuantizeConfig(bits=4, group_size=GROUP, sym=True, desc_act=False)
    model = GPTQModel.load(str(source), config, device="cpu")
    model.quantize([w for w in windows if w], batch_size=4)
    model.save(str(out))


if __name__ == "__main__":
    _run_gptqmodel(Path(sys.argv[1]), Path(sys.argv[2]))
