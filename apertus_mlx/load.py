"""Load Apertus checkpoints (Hugging Face or MLX, full precision or quantized) from disk or the hub."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer
from mlx_lm.utils import infer_quant_config

from . import formats, hub
from .errors import CheckpointError, ConfigError, ModelNotFoundError
from .model import Model, ModelArgs
from .progress import ProgressCallback

_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.-]+)?$")  # owner/name, with an optional GGUF quant tag
END_OF_TURN = "<|assistant_end|>"
# Used when no model is named; offline and uncached, the bundled demo model stands in.
DEFAULT_MODEL = "swiss-ai/Apertus-8B-Instruct-2509"
DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"


def resolve(
    path_or_repo: str | os.PathLike, revision: str | None = None, progress: ProgressCallback | None = None
) -> Path:
    """A local model directory or .gguf file: the path itself, or what `hub.download` fetches (with progress bars).

    With `progress`, the download reports to it instead of drawing bars on the terminal. Honours
    `HF_HUB_OFFLINE=1`, in which case only the local hub cache is consulted.
    """
    path = Path(path_or_repo).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    name = str(path_or_repo)
    if path.exists():
        raise ModelNotFoundError(f"model path {name} is a file; expected a directory with config.json or a .gguf file")
    if name.startswith((".", "/", "~")) or not _REPO_ID.match(name):
        raise ModelNotFoundError(f"model path {name} does not exist")

    return hub.download(name, revision=revision, progress=progress)


def choose_model(
    requested: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
    default: str = DEFAULT_MODEL,
) -> tuple[Path, str | None]:
    """The model directory to use, and a note when it is a fallback.

    Order: `requested`, then `$APERTUS_MODEL`, then `default` (downloaded if online); if that cannot
    be had, the bundled demo model, with a note saying so.
    """
    requested = requested or os.environ.get("APERTUS_MODEL")
    if requested:
        return resolve(requested, progress=progress), None
    try:
        return resolve(default, progress=progress), None
    except ModelNotFoundError:
        hint = "pass --model PATH_OR_REPO or set APERTUS_MODEL"
        if not (DEMO_MODEL / "config.json").is_file():
            missing = f"no model given and the default {default} cannot be had offline; {hint}"
            raise ModelNotFoundError(missing) from None
        note = (
            f"note: {default} is not available offline; using the bundled demo model "
            f"(a tiny model trained for tests, not a useful assistant). To chat for real, {hint}."
        )
        return DEMO_MODEL, note


def load_config(path: Path) -> dict[str, Any]:
    """`config.json` of a model directory, as a dict."""
    file = path / "config.json"
    if not file.is_file():
        raise ModelNotFoundError(f"{path}: no config.json; is this a model directory?")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return config


def load_model(path_or_repo: str | os.PathLike, lazy: bool = False) -> Model:
    """Build the model from a checkpoint directory or repo id.

    Weights are memory-mapped and read on first use; with `lazy=False` they are read now. A quantized
    checkpoint gets quantized layers before its weights are attached, so no full-precision copy is made.
    """
    path = resolve(path_or_repo)
    if fmt := formats.detect(path):
        model = formats.load_model(path, fmt, lazy=lazy)
        model.checkpoint_path = path
        return model
    config = load_config(path)
    model = Model(ModelArgs.from_config(config))
    weights, origin = _read_weights(path)
    weights = model.sanitize(weights)
    _quantize(model, config, weights)
    _check_weights(model, weights, origin)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    model.checkpoint_path = path  # where images' vision tokenizer is read from (Apertus 1.5), on first use
    if not lazy:
        mx.eval(model.parameters())
    return model


def load_tokenizer(path: Path, config: dict[str, Any] | None = None) -> TokenizerWrapper:
    """The checkpoint's tokenizer (via `transformers.AutoTokenizer`) with every end-of-turn id as eos.

    The eos ids are the union of `generation_config.json`'s, `config.json`'s and `<|assistant_end|>`,
    which ends an Apertus chat turn.
    """
    if (fmt := formats.detect(path)) and (own := formats.load_tokenizer(path, fmt)) is not None:
        return own
    config = config if config is not None else load_config(path)
    text_config = config.get("text_config")  # Apertus 1.5's full model keeps its text settings there
    eos = _as_list(
        config.get("eos_token_id", text_config.get("eos_token_id") if isinstance(text_config, dict) else None)
    )
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        try:
            eos += _as_list(json.loads(gen_file.read_text(encoding="utf-8")).get("eos_token_id"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{gen_file}: not valid JSON ({_first_line(e)})") from None
    try:
        tokenizer = load_mlx_lm_tokenizer(path, eos_token_ids=eos)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({_first_line(e)})") from None
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        tokenizer.add_eos_token(END_OF_TURN)
    return tokenizer


def load(path_or_repo: str | os.PathLike, lazy: bool = False) -> tuple[Model, TokenizerWrapper]:
    """(model, tokenizer) from a local directory or a Hugging Face repo id."""
    path = resolve(path_or_repo)
    return load_model(path, lazy=lazy), load_tokenizer(path)


def make_cache(model: Model, max_kv_size: int | None = None) -> list[Any]:
    """A fresh KV cache for incremental decoding with `model(ids, cache=cache)`."""
    return model.make_cache(max_kv_size=max_kv_size)


def _read_weights(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Every tensor of the checkpoint (memory-mapped), and the file each came from."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: unreadable weight_map ({_first_line(e)})") from None
        files = [path / n for n in names]
        if missing := [f.name for f in files if not f.is_file()]:
            raise CheckpointError(f"{path}: {missing[0]} is listed in {index.name} but missing")
    else:
        files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no model*.safetensors weight files")

    weights: dict[str, mx.array] = {}
    origin: dict[str, str] = {}
    for file in files:
        try:
            tensors = mx.load(str(file))
        except (RuntimeError, ValueError, OSError) as e:
            raise CheckpointError(f"{file}: unreadable safetensors ({_first_line(e)})") from None
        weights.update(tensors)
        origin.update(dict.fromkeys(tensors, file.name))
    return weights, origin


def _quantize(model: Model, config: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Swap in quantized layers where the checkpoint (mlx-lm's format) holds quantized tensors."""
    quant = config.get("quantization")
    if quant is None:
        legacy = config.get("quantization_config")
        if not legacy:
            return
        if "quant_method" in legacy and "bits" not in legacy:
            raise ConfigError(
                f"config.json: quantization_config.quant_method {legacy['quant_method']!r} is not supported "
                "(GPTQ and NVFP4 are); use an MLX checkpoint, or convert the full-precision one with "
                "python -m apertus_mlx.convert"
            )
        quant = legacy
    if missing := [k for k in ("bits", "group_size") if k not in quant]:
        raise ConfigError(f"config.json: quantization lacks {', '.join(missing)}")
    _own_layers(model, quant)

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized"):
            return False
        if path in quant:  # per-layer override: parameters, or False for a layer kept in full precision
            return quant[path]
        if f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    try:
        nn.quantize(
            model,
            group_size=quant["group_size"],
            bits=quant["bits"],
            mode=quant.get("mode", "affine"),
            class_predicate=predicate,
        )
    except ValueError as e:
        raise ConfigError(f"config.json: bad quantization settings ({_first_line(e)})") from None


def _own_layers(model: Model, quant: dict[str, Any]) -> None:
    """Put our own quantized layer types where the `quantization` block names them (saved imports of GPTQ, EoRA,
    NVFP4); `nn.quantize` then leaves them be."""
    from .lowrank import CastQuantizedLinear, LowRankQuantizedLinear
    from .scaled_linear import ScaledQuantizedLinear

    # The first key an entry has decides (a low-rank layer has exact scales too).
    kinds = {
        "low_rank": LowRankQuantizedLinear,
        "tensor_scale": ScaledQuantizedLinear,
        "exact_scales": CastQuantizedLinear,
    }
    modules = dict(model.named_modules())
    for path, params in quant.items():
        kind = next((cls for key, cls in kinds.items() if isinstance(params, dict) and key in params), None)
        if kind is None:
            continue
        linear = modules.get(path)
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"config.json: quantization names {path}, which is not a linear layer of this model")
        out_dims, in_dims = linear.weight.shape
        try:
            layer = kind.empty(in_dims, out_dims, params, bias="bias" in linear)
        except (KeyError, ValueError) as e:
            problem = _first_line(e)
            raise ConfigError(f"config.json: quantization.{path} is not a valid layer entry ({problem})") from None
        model.update_modules(tree_unflatten([(path, layer)]))


def _check_weights(model: Model, weights: dict[str, mx.array], origin: dict[str, str]) -> None:
    """Fail with the tensor's name and file when the checkpoint does not fit the config."""
    expected = dict(tree_flatten(model.parameters()))
    if missing := [k for k in expected if k not in weights]:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint lacks tensor {missing[0]}{more}")
    if extra := [k for k in weights if k not in expected]:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{origin.get(extra[0], 'checkpoint')}: unexpected tensor {extra[0]}{more}")
    for name, param in expected.items():
        if weights[name].shape != param.shape:
            raise CheckpointError(
                f"{origin.get(name, 'checkpoint')}: tensor {name} has shape {tuple(weights[name].shape)}, "
                f"config.json implies {tuple(param.shape)}"
            )


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
