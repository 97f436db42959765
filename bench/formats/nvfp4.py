"""NVFP4 contenders: the source written by NVIDIA ModelOpt and by llm-compressor (compressed-tensors), when installed.

Each tool runs in a subprocess (`python -m bench.formats.nvfp4 TOOL SOURCE OUT`): both patch torch and
transformers on import, which the other formats' writers must not see. Without a tool, its layout is written by
our own writer instead, labelled so: MLX's nvfp4 RTN of each weight divided by ModelOpt's tensor scale
amax / (6·448), which is ModelOpt's recipe. MLX's own nvfp4 and mxfp4 RTN (no tensor scale, saved as MLX
checkpoints) are measured beside them for comparison.

Both tools install here without their CUDA dependencies (`pip install --no-deps nvidia-modelopt llmcompressor
compressed-tensors` plus the pure-Python packages they import) and quantize on the CPU in seconds.

MLX 0.32's nvfp4 matmul on the CPU backend is a slow fallback (about 6x its affine 4-bit matmul): measure these
on Metal or CUDA, or with few evaluation windows.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from apertus_mlx.load import load_config, load_model
from apertus_mlx.save import save_model

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
LINEARS = ("_proj.weight",)  # every decoder linear (q/k/v/o, up/down); lm_head and embeddings stay BF16
CALIBRATION_TOKENS = 64  # weight-only: the tensor scales come from the weights, the data only drives a pass


def contenders(source: Path, scratch: Path) -> list[tuple[str, Path]]:
    """(label, checkpoint) for ModelOpt's layout, compressed-tensors' layout, and MLX's own RTN for comparison."""
    made = []
    for tool, label, writer in (
        ("modelopt", "nvfp4/modelopt W4A16_NVFP4", _write_modelopt_layout),
        ("llmcompressor", "nvfp4/llm-compressor NVFP4A16", _write_compressed_tensors_layout),
    ):
        out = scratch / tool
        if importlib.util.find_spec(tool) is not None:
            command = [sys.executable, "-m", "bench.formats.nvfp4", tool, str(source), str(out)]
            subprocess.run(command, check=True, cwd=REPO)
        else:
            writer(source, out)
            label = label.split()[0] + " layout (our writer: " + tool + " not installed)"
        _copy_tokenizer(source, out)
        made.append((label, out))
    for mode in ("nvfp4", "mxfp4"):
        made.append((f"nvfp4/mlx {mode} RTN (no tensor scale, for comparison)", _mlx_rtn(source, scratch / mode, mode)))
    return made


def _run_tool(tool: str, source: Path, out: Path) -> None:
    """Quantize `source` with the tool itself, weight-only NVFP4, lm_head and embeddings left in BF16."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    tokens = torch.randint(
        16, model.config.vocab_size, (2, CALIBRATION_TOKENS), generator=torch.Generator().manual_seed(0)
    )
    if tool == "modelopt":
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint

        def forward_loop(m):
            with torch.no_grad():
                m(tokens)

        model = mtq.quantize(model, mtq.W4A16_NVFP4_CFG, forward_loop=forward_loop)
        export_hf_checkpoint(model, export_dir=out)
    else:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier

        oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="NVFP4A16", ignore=["lm_head"]))
        model.save_pretrained(out, save_compressed=True)


def _nvfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """(codes uint8 [out, in/2], E4M3 scale bytes [out, in/16], tensor scale): MLX's nvfp4 RTN of w / scale."""
    tensor_scale = np.float32(np.abs(w).max() / (6 * 448))
    codes, scales = mx.quantize(mx.array(w / tensor_scale), group_size=16, bits=4, mode="nvfp4")
    return np.array(codes).view(np.uint8), np.array(scales), tensor_scale


def _write_modelopt_layout(source: Path, out: Path) -> None:
    tensors = _tensors(source)
    for name in [k for k in tensors if k.endswith(LINEARS)]:
        module = name.removesuffix(".weight")
        codes, scales, tensor_scale = _nvfp4(tensors.pop(name))
        tensors.update({name: codes, f"{module}.weight_scale": scales, f"{module}.weight_scale_2": tensor_scale})
    _save(tensors, source, out, {k for k in tensors if k.endswith(".weight_scale")})
    quant = {"quant_algo": "W4A16_NVFP4", "group_size": 16, "exclude_modules": ["lm_head", "model.embed_tokens"]}
    (out / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "ours"}, "quantization": quant}))


def _write_compressed_tensors_layout(source: Path, out: Path) -> None:
    tensors = _tensors(source)
    for name in [k for k in tensors if k.endswith(LINEARS)]:
        module = name.removesuffix(".weight")
        codes, scales, tensor_scale = _nvfp4(tensors.pop(name))
        tensors.update(
            {
                f"{module}.weight_packed": codes,
                f"{module}.weight_scale": scales,
                f"{module}.weight_global_scale": np.array([1 / tensor_scale], np.float32),
            }
        )
    _save(tensors, source, out, {k for k in tensors if k.endswith(".weight_scale")})
    weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True}
    group = {"format": "nvfp4-pack-quantized", "targets": ["Linear"], "weights": weights, "input_activations": None}
    config = load_config(out)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _tensors(source: Path) -> dict[str, np.ndarray]:
    """The source's tensors in float32 (numpy has no bfloat16); `_save` writes the float ones back as BF16."""
    return {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(source / "model.safetensors")).items()}


def _save(tensors: dict[str, np.ndarray], source: Path, out: Path, fp8: set[str]) -> None:
    """Float tensors as BF16, E4M3 scale bytes as F8_E4M3 (through torch, which has both dtypes)."""
    import torch
    from safetensors.torch import save_file as save_torch

    def tensor(name: str, a: np.ndarray):
        t = torch.from_numpy(np.asarray(a))
        if name in fp8:
            return t.view(torch.float8_e4m3fn)
        if name.endswith(("_scale_2", "_global_scale")) or a.dtype == np.uint8:
            return t
        return t.to(torch.bfloat16)

    out.mkdir(parents=True)
    shutil.copy2(source / "config.json", out / "config.json")
    save_torch({k: tensor(k, a) for k, a in tensors.items()}, str(out / "model.safetensors"))


def _mlx_rtn(source: Path, out: Path, mode: str) -> Path:
    """MLX's own `mode` RTN of the decoder's linears (lm_head and embeddings in BF16), as an MLX checkpoint."""
    model = load_model(source)
    nn.quantize(model, mode=mode, class_predicate=lambda path, m: isinstance(m, nn.Linear) and path != "lm_head")
    return save_model(out, model, load_config(source), copy_from=source)


def _copy_tokenizer(source: Path, out: Path) -> None:
    for pattern in TOKENIZER_FILES:
        for file in source.glob(pattern):
            shutil.copy2(file, out / file.name)


if __name__ == "__main__":
    _run_tool(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
