"""Published checkpoints that load as they are, with no conversion step: GGUF, GPTQ (+ EoRA), NVFP4.

Each format is one module with the same three functions:

- `matches(path) -> bool`: whether `path` (a directory, or a `.gguf` file) is in that format;
- `load_model(path, lazy) -> tuple[Model, ImportSummary]`: our `Model` with the format's tensors in our
  quantized layers (no full-precision copy unless the summary says so);
- `load_tokenizer(path) -> TokenizerWrapper | None`: a tokenizer the format carries itself (GGUF's metadata),
  or None when the directory's usual Hugging Face tokenizer files apply.

`apertus_mlx.load` asks `detect()` first and falls back to the Hugging Face / MLX path when no format matches.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger("apertus_mlx.formats")


@dataclass
class ImportSummary:
    """What an import did, printed when it loads: format, bits per module, bits per weight, memory, re-quantization.

    `modules` counts quantized weights (parameters, not tensors) per storage description, for example
    `{"Q4_K -> affine 4-bit g32": 5_800_000_000, "F32 norm": 1_200_000}`.
    """

    format: str  # "GGUF Q4_K_M", "GPTQ (gptq_v2) + EoRA", "NVFP4 (ModelOpt)"
    modules: Counter = field(default_factory=Counter)
    weight_bytes: int = 0  # bytes of the loaded weights in memory
    notes: list[str] = field(default_factory=list)  # re-quantization done, with its measured error; exclusions

    @property
    def parameters(self) -> int:
        return sum(self.modules.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.weight_bytes / max(self.parameters, 1)

    def lines(self) -> list[str]:
        """The summary as short lines, widest share first."""
        total = max(self.parameters, 1)
        out = [
            f"{self.format}: {self.parameters / 1e6:,.1f}M weights, {self.bits_per_weight:.2f} bits per weight, "
            f"{self.weight_bytes / 2**20:,.1f} MiB"
        ]
        out += [f"  {n / total:6.1%}  {what}" for what, n in self.modules.most_common()]
        out += [f"  note: {note}" for note in self.notes]
        return out


def read_json(file: Path) -> dict[str, Any] | None:
    """A JSON object file's contents, or None when it is missing, unreadable or not an object (for detection)."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _modules() -> dict[str, ModuleType]:
    from . import gguf, gptq, nvfp4

    return {"gguf": gguf, "gptq": gptq, "nvfp4": nvfp4}


def detect(path: Path) -> str | None:
    """The name of the published format `path` is in ("gguf", "gptq", "nvfp4"), or None for HF / MLX checkpoints."""
    for name, module in _modules().items():
        if module.matches(path):
            return name
    return None


def load_model(path: Path, name: str, lazy: bool = False):
    """Load `path` with format `name`'s loader; logs the summary and keeps it as `model.import_summary`."""
    model, summary = _modules()[name].load_model(path, lazy=lazy)
    model.import_summary = summary
    for line in summary.lines():
        log.info(line)
    return model


def load_tokenizer(path: Path, name: str):
    """The format's own tokenizer, or None when the usual Hugging Face files apply."""
    return _modules()[name].load_tokenizer(path)


def source_config(path: Path, name: str) -> dict[str, Any]:
    """The checkpoint's settings as a Hugging Face `config.json` dict (a GGUF's come from its metadata)."""
    if name == "gguf":
        return _modules()["gguf"].config(path)
    from ..load import load_config

    return load_config(path)


def label(path: Path, name: str) -> str:
    """How a GGUF checkpoint's weights are stored, as its file type says: "GGUF Q4_K_M"."""
    return _modules()[name].label(path)


def weight_files(path: Path) -> list[Path]:
    """The files that hold the weights: a GGUF file itself, else the directory's safetensors."""
    if _modules()["gguf"].matches(path):
        return [_modules()["gguf"].gguf_file(path)]
    return sorted(path.glob("*.safetensors"))


def save_as_mlx(path: Path, out: Path, overwrite: bool = False) -> tuple[Path, ImportSummary]:
    """Write the published checkpoint at `path` as an MLX checkpoint in `out` (atomically), its layers as imported.

    Later loads then skip the format's conversion. A GGUF file's tokenizer and chat template are written from
    its metadata; a directory's tokenizer files are copied.
    """
    from ..load import load_model as load
    from ..save import save_model

    name = detect(path)
    if name is None:
        raise ValueError(f"{path} is not a GGUF, GPTQ or NVFP4 checkpoint")
    model = load(path)
    tokenizer = load_tokenizer(path, name)

    def write_tokenizer(directory: Path) -> None:
        if tokenizer is not None:
            tokenizer._tokenizer.save_pretrained(directory)

    copy_from = path if path.is_dir() else None
    saved = save_model(out, model, source_config(path, name), copy_from, overwrite, before_commit=write_tokenizer)
    return saved, model.import_summary
