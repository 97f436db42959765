"""GGUF files (llama.cpp's format) loaded as they are: metadata to our config, ggml blocks to MLX affine layers.

Groups of 32 (Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K) become `nn.QuantizedLinear` / `nn.QuantizedEmbedding` bit for
bit; Q6_K, Q3_K and Q2_K (groups of 16, which MLX's quantized matmul lacks) follow `APERTUS_GGUF_GROUP16`
(see `gguf_tensors`). F32/F16/BF16 tensors stay float; F32 norms take a 16-bit embedding's dtype where exact.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from gguf import GGUFReader
from mlx.utils import tree_unflatten

from ..errors import CheckpointError, ModelNotFoundError
from ..lowrank import quantized_linear
from ..model import Model, ModelArgs
from . import ImportSummary
from .gguf_model import file_type, gguf_config, match_embedding_dtype, our_name, set_rope, set_xielu
from .gguf_tensors import Converter, metadata

EMBEDDING = "model.embed_tokens"
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
# A quant tag in a file name: Q4_K_M, IQ4_XS, Q8_0, BF16, F16, F32, MXFP4 ...
_TAG = re.compile(r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Za-z0-9]+)*|BF16|F16|F32|MXFP4(?:_MOE)?)(?![A-Za-z0-9])", re.I)


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
    """Our `Model` from a GGUF file (or a directory holding one), with its summary.

    The file is memory-mapped and converted one tensor (at most 16M weights) at a time, so no float copy of
    the model is made; ggml blocks must be repacked for MLX, so every tensor is read now even with `lazy`.
    """
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
        ours = our_name(name, file.name)
        arrays, settings = convert(tensor)
        module = ours.rsplit(".", 1)[0]
        weights.update({f"{module}.{k}": v for k, v in arrays.items()})
        if settings:
            quant[module] = settings
    # Projections hold the file's exact fp16/fp32 scales and return the model's own dtype (`CastQuantizedLinear`),
    # built from the arrays: `nn.quantize` would first quantize a random weight per layer.
    layers = [
        (p, quantized_linear(*(weights.get(f"{p}.{k}") for k in ("weight", "scales", "biases")), **s))
        for p, s in quant.items()
        if p != EMBEDDING
    ]
    model.update_modules(tree_unflatten(layers))
    nn.quantize(model, class_predicate=lambda p, m: quant.get(p, False) if p == EMBEDDING else False)
    set_xielu(reader, model, weights, file.name)
    match_embedding_dtype(weights)
    expected = {k for k, _ in nn.utils.tree_flatten(model.parameters())}
    if missing := sorted(expected - weights.keys()):
        raise CheckpointError(f"{file.name}: lacks the tensor for {missing[0]}")
    model.load_weights(list(weights.items()), strict=True)
    set_rope(model, tensors, file.name)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    summary = ImportSummary(
        format=f"GGUF {file_type(reader, tensors)}",
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


def config(path: Path) -> dict[str, Any]:
    """The file's settings as a Hugging Face config dict, from its metadata alone (no tensor is read)."""
    file = gguf_file(path)
    reader = open_reader(file)
    return gguf_config(reader, {t.name: t for t in reader.tensors}, file.name)


def label(path: Path) -> str:
    """How the weights are stored, as the file says it: "GGUF Q4_K_M"."""
    reader = open_reader(gguf_file(path))
    return f"GGUF {file_type(reader, {t.name: t for t in reader.tensors})}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
