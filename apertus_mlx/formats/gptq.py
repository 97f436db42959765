"""GPTQ checkpoints (GPTQModel's `gptq` / `gptq_v2` layouts), with EoRA adapters, in MLX affine quantized layers.

Per quantized module the files hold `qweight` int32 [in·bits/32, out] (codes packed along the input, least
significant bits first; 3-bit codes run on across words), `qzeros` int32 [in/g, out·bits/32] packed the same
way along the output, `scales` [in/g, out] and `g_idx` [in]. `gptq` (v1) stores each zero minus one, `gptq_v2`
the zero itself; the weight is w = scale·(q − zero) per group of g inputs.

Transposed, `qweight` is MLX's affine weight word for word: MLX packs codes along the input, least significant
bits first, as one bit stream. So scales = scalesᵀ and biases = −zero·scale; nothing is re-quantized. Scales and
biases stay float32, where scale·q − zero·scale is exact; the layers cast their output to the model's dtype.
BF16 scales would round each weight by up to 2^-8, as much as INT8's own step: on the yardstick model an INT8
import's KL rose from 0.0018 to 0.022 with them.

EoRA adapters add (x·Aᵀ)·Bᵀ, unscaled, on a `LowRankQuantizedLinear`. They come as a PEFT file
(`adapter_model.safetensors`, `…lora_A.weight` [r, in], `…lora_B.weight` [out, r]) in the directory or a
subfolder, or "merged" into the model file as `…lora_A` [in, r] and `…lora_B` [r, out].
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..errors import CheckpointError, ConfigError
from ..lowrank import LowRankQuantizedLinear, quantized_linear
from ..model import Model, ModelArgs
from . import ImportSummary, read_json

BITS = (2, 3, 4, 8)  # what GPTQModel writes in these layouts and MLX's affine mode runs
MLX_GROUPS = (128, 64, 32)
ADAPTER_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DTYPE_NAMES = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32"}


@dataclass(frozen=True)
class Settings:
    """One module's quantization: the checkpoint's defaults with its `dynamic` override applied."""

    bits: int
    group_size: int
    sym: bool
    desc_act: bool


def _method(quant: dict[str, Any]) -> str | None:
    return quant.get("quant_method", quant.get("method"))


def quant_config(path: Path) -> dict[str, Any] | None:
    """The GPTQ settings: config.json's `quantization_config`, else GPTQModel/AutoGPTQ's `quantize_config.json`."""
    if not path.is_dir():
        return None
    quant = (read_json(path / "config.json") or {}).get("quantization_config")
    if isinstance(quant, dict):
        return quant if _method(quant) == "gptq" else None
    quant = read_json(path / "quantize_config.json")
    if quant is not None and _method(quant) in ("gptq", None) and "bits" in quant:
        return quant
    return None


def matches(path: Path) -> bool:
    return quant_config(path) is not None


def load_tokenizer(path: Path):
    return None  # GPTQ repositories carry the usual Hugging Face tokenizer files


def module_settings(quant: dict[str, Any], name: str) -> Settings | None:
    """`name`'s settings, or None when `dynamic` leaves it unquantized (`-:`).

    As GPTQModel does: the first pattern (a regex anchored at the start of the name) that matches wins;
    `+:` or no prefix overrides the defaults, `-:` excludes the module.
    """
    base = Settings(
        bits=int(quant["bits"]),
        group_size=int(quant.get("group_size", 128)),
        sym=bool(quant.get("sym", True)),
        desc_act=bool(quant.get("desc_act", False)),
    )
    for pattern, overrides in (quant.get("dynamic") or {}).items():
        if re.match(pattern[2:] if pattern.startswith(("-:", "+:")) else pattern, name):
            if pattern.startswith("-:"):
                return None
            known = {k: type(getattr(base, k))(v) for k, v in overrides.items() if k in Settings.__dataclass_fields__}
            return replace(base, **known)
    return base


def _unpack(packed: mx.array, bits: int, count: int) -> mx.array:
    """The `count` codes of `bits` bits each that int32 words hold along the last axis, LSB first, as uint32."""
    stream = packed.view(mx.uint8)  # little-endian: the words' bytes in order are one bit stream
    flags = (stream[..., None] >> mx.arange(8, dtype=mx.uint8)) & 1
    fields = flags.reshape(*stream.shape[:-1], -1, bits)[..., :count, :].astype(mx.uint32)
    return (fields << mx.arange(bits, dtype=mx.uint32)).sum(axis=-1)


class _Tensors:
    """The checkpoint's tensors, taken out one by one, each remembered with the file it came from."""

    def __init__(self, tensors: dict[str, mx.array], origin: dict[str, str]):
        self.tensors, self.origin = tensors, origin

    def take(self, name: str, required: bool = True) -> mx.array | None:
        if name not in self.tensors:
            if required:
                raise CheckpointError(f"GPTQ checkpoint lacks tensor {name}")
            return None
        return self.tensors.pop(name)


def _quantized(
    name: str, t: _Tensors, s: Settings, fmt: str, in_dims: int, out_dims: int
) -> tuple[mx.array, mx.array, mx.array, int]:
    """MLX's (weight, scales, biases, group size) for GPTQ module `name`."""
    if s.bits not in BITS:
        raise ConfigError(f"GPTQ bits={s.bits} ({name}) is not supported; MLX runs {', '.join(map(str, BITS))}")
    group = in_dims if s.group_size == -1 else s.group_size
    mlx_group = next((g for g in MLX_GROUPS if group % g == 0), None)
    if mlx_group is None or in_dims % group:
        raise ConfigError(f"GPTQ group_size={s.group_size} ({name}, {in_dims} inputs) has no MLX group size")
    qweight, qzeros, scales = (t.take(f"{name}.{k}") for k in ("qweight", "qzeros", "scales"))
    groups = in_dims // group
    expected = {
        "qweight": (qweight, (in_dims * s.bits // 32, out_dims)),
        "qzeros": (qzeros, (groups, out_dims * s.bits // 32)),
        "scales": (scales, (groups, out_dims)),
    }
    for key, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"tensor {name}.{key} has shape {tuple(tensor.shape)}, expected {shape} for {s.bits}-bit g{group}"
            )
        if key != "scales" and tensor.dtype != mx.int32:
            raise CheckpointError(f"tensor {name}.{key} is {tensor.dtype}; only int32 packing is supported")
    g_idx = t.take(f"{name}.g_idx", required=False)
    if g_idx is not None and not mx.array_equal(g_idx, mx.arange(in_dims) // group).item():
        # desc_act reorders the inputs: the groups are no longer runs of g, and MLX has no input permutation.
        raise ConfigError(f"GPTQ desc_act (act-order g_idx) is not supported: {name}")

    zeros = _unpack(qzeros, s.bits, out_dims)
    if fmt == "gptq":
        zeros = (zeros + 1) & ((1 << s.bits) - 1)  # v1 stores zero−1 per field
    # float32 holds fp16/bf16 scales and zero·scale (at most 11 + 8 significant bits) exactly.
    scales = scales.T.astype(mx.float32)
    biases = -zeros.T.astype(mx.float32) * scales
    if mlx_group != group:  # per-channel or large groups: each scale repeats over MLX's smaller groups
        scales, biases = (mx.repeat(a, group // mlx_group, axis=1) for a in (scales, biases))
    weight = mx.contiguous(qweight.T).view(mx.uint32)
    return weight, scales, biases, mlx_group


def _adapter_file(path: Path) -> Path | None:
    files = sorted(path.rglob(ADAPTER_FILE))
    if len(files) > 1:
        listed = ", ".join(str(f.relative_to(path)) for f in files)
        raise CheckpointError(f"{path}: several EoRA adapter files ({listed}); keep one")
    return files[0] if files else None


def _adapters(path: Path, t: _Tensors) -> tuple[dict[str, tuple[mx.array, mx.array, str]], str | None]:
    """Per module, (A [r, in], B [out, r], the name of A) from a PEFT file or merged buffers; and their source."""
    merged = {k[: -len(".lora_A")] for k in t.tensors if k.endswith(".lora_A")}
    file = _adapter_file(path)
    if merged and file:
        raise CheckpointError(f"{path}: EoRA tensors both merged into the model and in {file.relative_to(path)}")
    if merged:
        # GPTQModel's merged buffers are stored for x @ A @ B: A [in, r], B [r, out].
        out = {m: (t.take(f"{m}.lora_A").T, t.take(f"{m}.lora_B").T, f"{m}.lora_A") for m in merged}
        return out, "merged into the model file"
    if file is None:
        return {}, None
    try:
        tensors = mx.load(str(file))
    except (RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors ({str(e).splitlines()[0]})") from None
    out = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PEFT_PREFIX)[: -len(".lora_A.weight")]
            b_key = key.replace(".lora_A.weight", ".lora_B.weight")
            if b_key not in tensors:
                raise CheckpointError(f"{file.name}: {key} has no {b_key}")
            out[module] = (tensors[key], tensors[b_key], key)
    return out, str(file.relative_to(path))


def _check_adapter(name: str, a: mx.array, b: mx.array, a_key: str, in_dims: int, out_dims: int) -> None:
    rank = a.shape[0]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_dims or tuple(b.shape) != (out_dims, rank):
        raise CheckpointError(
            f"EoRA adapter {a_key}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit {name} "
            f"({in_dims} in, {out_dims} out): expected A (r, {in_dims}), B ({out_dims}, r)"
        )


def load_model(path: Path, lazy: bool = False) -> tuple[Model, ImportSummary]:
    """Our model with each GPTQ module in an affine quantized layer (with its EoRA path) and the rest as stored."""
    from ..load import _check_weights, _read_weights, load_config

    quant = quant_config(path)
    if quant is None:
        raise ConfigError(f"{path}: not a GPTQ checkpoint")
    if "bits" not in quant:
        raise ConfigError(f"{path}: GPTQ quantization_config lacks bits")
    fmt = quant.get("checkpoint_format", quant.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"GPTQ checkpoint_format {fmt!r} is not supported (only 'gptq' and 'gptq_v2')")
    config = load_config(path)
    model = Model(ModelArgs.from_config(config))
    weights, origin = _read_weights(path)
    t = _Tensors(model.sanitize(weights), origin)
    adapters, adapter_source = _adapters(path, t)
    embed = t.tensors.get(f"{model.decoder_prefix}.embed_tokens.weight")
    dtype = embed.dtype if embed is not None and embed.dtype in DTYPE_NAMES else mx.bfloat16

    summary = ImportSummary(format="")
    layers, loaded, left_out = [], {}, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        out_dims, in_dims = module.weight.shape
        s = module_settings(quant, name)
        adapter = adapters.pop(name, None)
        if s is None or f"{name}.qweight" not in t.tensors:
            left_out += s is None
            if adapter is not None:
                raise CheckpointError(f"EoRA adapter {adapter[2]} is for {name}, which is not quantized")
            continue
        weight, scales, biases, group = _quantized(name, t, s, fmt, in_dims, out_dims)
        layer = quantized_linear(weight, scales, biases, group, s.bits)
        what = f"INT{s.bits} " + ("per-channel" if s.group_size == -1 else f"g{s.group_size}")
        if adapter is not None:
            a, b, a_key = adapter
            _check_adapter(name, a, b, a_key, in_dims, out_dims)
            layer = LowRankQuantizedLinear.from_quantized(layer, a.astype(dtype), b.astype(dtype))
            what += f" + EoRA r{a.shape[0]}"
        if (bias := t.take(f"{name}.bias", required=False)) is not None:
            layer.bias = bias
        layers.append((name, layer))
        summary.modules[what] += in_dims * out_dims
        loaded.update({f"{name}.{k}": v for k, v in _flat(layer).items()})
    if adapters:
        unused = next(iter(adapters.values()))[2]
        raise CheckpointError(f"EoRA adapter {unused} names no linear layer of this model")
    if stray := [k for k in t.tensors if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))]:
        raise CheckpointError(f"GPTQ tensor {stray[0]} belongs to no quantized linear layer (see `dynamic`)")

    model.update_modules(tree_unflatten(layers))
    floats = t.tensors
    _check_weights(model, {**floats, **loaded}, t.origin)
    model.load_weights(list(floats.items()), strict=False)  # the quantized layers already hold theirs
    model.eval()
    if not lazy:
        mx.eval(model.parameters())

    for w in floats.values():
        summary.modules[DTYPE_NAMES.get(w.dtype, str(w.dtype))] += w.size
    summary.weight_bytes = sum(w.nbytes for w in [*floats.values(), *loaded.values()])
    summary.format = _describe(quant, fmt) + (" + EoRA" if adapter_source else "")
    summary.notes += _notes(dtype, left_out, adapter_source, quant)
    return model, summary


def _flat(layer: nn.Module) -> dict[str, mx.array]:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(layer.parameters()))


def _describe(quant: dict[str, Any], fmt: str) -> str:
    group = quant.get("group_size", 128)
    sym = "sym" if quant.get("sym", True) else "asym"
    return f"GPTQ ({fmt}, {sym}, {'per-channel' if group == -1 else f'g{group}'})"


def _notes(dtype: mx.Dtype, left_out: int, adapter_source: str | None, quant: dict[str, Any]) -> list[str]:
    notes = [
        f"nothing re-quantized: GPTQ's codes as they are, scales and zero offsets in F32 (exact), "
        f"activations in {DTYPE_NAMES[dtype]}"
    ]
    if left_out:
        notes.append(f"{left_out} linear layer(s) left unquantized by `dynamic`")
    if adapter_source:
        notes.append(f"EoRA adapters from {adapter_source}, applied unscaled (lora_alpha ignored, as GPTQModel does)")
    if quant.get("lm_head"):
        notes.append("the LM head is quantized")
    return notes
