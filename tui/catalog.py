"""What the model picker offers: Apertus models on this machine, and the published repositories to fetch.

Pure Python (no Textual, no MLX calls here): the picker screen and the app both read it.

`PUBLISHED` lists only repository ids for which evidence was found, each with the page it was checked
against (`source`) and what that page shows (`evidence`). Checked against stored copies of public pages and
public GitHub files, without access to the Hugging Face API itself:

- Official MLX builds of Apertus-v1.1 (swiss-ai/Apertus-v1.1-*-Instruct-MLX-INT*): the model cards say
  they come in INT2, INT3, INT4 and INT6, but only six repository ids were seen (0.5B INT4; 1.5B INT3
  and INT4; 4B INT3, INT4 and INT6), in a listing of swiss-ai's models taken from the Hugging Face API
  (2026-09-30) and kept in a public GitHub file. The other sizes and widths (0.5B INT2/INT3/INT6, 1.5B
  INT2/INT6, 4B INT2, any INT5) could not be verified and are left out rather than guessed.
- Community builds of Apertus-8B-Instruct-2509 by mlx-community (4-, 6- and 8-bit), seen in public code.
- BF16 originals from swiss-ai (8B and 70B 2509, v1.1 0.5B/1.5B/4B Instruct): too big for many Macs;
  the picker offers to convert them with the `budget` recipe to fit.

Sizes marked `size_estimated` are parameters x bits (plus 0.5 bit per weight of group scales and biases
for the MLX builds), not measured files. KV-cache sizes per token of the v1.1 models come from a public
third-party catalogue (ONNX exports of the same models), and the 70B's from its published shape; all are
used only for the fit verdict, which the real files replace once a model is on disk.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from apertus_mlx.model_info import FIT_CONTEXT, USABLE_RAM, ModelInfo, describe_model, fits_in_ram

from .config import data_dir

__all__ = [
    "FIT_CONTEXT",
    "PUBLISHED",
    "USABLE_RAM",
    "LocalModel",
    "PublishedModel",
    "conversion_dir",
    "default_models_dir",
    "fit_label",
    "format_size",
    "hub_cache_dir",
    "local_models",
    "original_of",
    "ram_gb_for",
    "total_ram_bytes",
]

# The config.json model_type of the repos the picker shows from the cache.
MODEL_TYPES = ("apertus", "apertus1p5", "apertus1p5_text")

_HF_LISTING = (
    "listing of swiss-ai's models from the Hugging Face API (2026-09-30), in a public GitHub file (stored code index)"
)


@dataclass(frozen=True)
class PublishedModel:
    """A repository on the Hugging Face hub that the picker offers to download."""

    repo_id: str
    parameters: float  # number of parameters
    quantization: str  # "INT4", "6-bit", "BF16", …
    size_bytes: int  # approximate download (weights)
    kv_bytes_per_token: int  # keys and values of every layer, at 16 bits
    family: str  # "official MLX", "community MLX" or "original"
    source: str  # the URL where the id was checked
    evidence: str  # what that source shows
    size_estimated: bool = True  # computed from parameters and bits, not read from the hub

    @property
    def name(self) -> str:
        return self.repo_id.rsplit("/", 1)[-1]

    @property
    def parameters_label(self) -> str:
        billions = self.parameters / 1e9
        return f"{billions:.1f}B" if billions < 1 else f"{billions:.3g}B"

    @property
    def convertible(self) -> bool:
        """Full-precision weights, which `python -m apertus_mlx.convert` can quantize to fit."""
        return self.quantization in ("BF16", "FP16", "FP32")

    def memory_bytes(self, context: int = FIT_CONTEXT) -> int:
        return self.size_bytes + self.kv_bytes_per_token * context

    def fits(self, ram_bytes: int | None, context: int = FIT_CONTEXT) -> bool | None:
        """Whether a chat of `context` tokens fits `ram_bytes` of memory; None when the RAM is unknown."""
        return None if ram_bytes is None else fits_in_ram(self.size_bytes, self.kv_bytes_per_token, ram_bytes, context)


def _estimate(parameters: float, bits: float) -> int:
    return int(parameters * bits / 8)


# KV bytes per token at 16 bits: 2 (keys, values) x 2 bytes x layers x KV heads x head dimension.
_KV_8B = 2 * 2 * 32 * 8 * 128  # Apertus-8B: 32 layers, 8 KV heads of 128
_KV_70B = 2 * 2 * 80 * 8 * 128  # Apertus-70B: 80 layers, 8 KV heads of 128
_KV_V11 = {"0.5B": 20480, "1.5B": 32768, "4B": 98304}  # from a public catalogue of the ONNX exports
_PARAMS_V11 = {"0.5B": 0.56e9, "1.5B": 1.5e9, "4B": 3.8e9}  # the hub's parameter counts (rounded)
_PARAMS_8B, _PARAMS_70B = 8.05e9, 70.6e9


def _official_mlx(size: str, bits: int, size_bytes: int | None = None, extra: str = "") -> PublishedModel:
    return PublishedModel(
        repo_id=f"swiss-ai/Apertus-v1.1-{size}-Instruct-MLX-INT{bits}",
        parameters=_PARAMS_V11[size],
        quantization=f"INT{bits}",
        size_bytes=size_bytes or _estimate(_PARAMS_V11[size], bits + 0.5),
        kv_bytes_per_token=_KV_V11[size],
        family="official MLX",
        source=f"https://huggingface.co/swiss-ai/Apertus-v1.1-{size}-Instruct-MLX-INT{bits}",
        evidence=f"{_HF_LISTING}{extra}",
        size_estimated=size_bytes is None,
    )


def _community_8b(bits: int, source: str, evidence: str) -> PublishedModel:
    return PublishedModel(
        repo_id=f"mlx-community/Apertus-8B-Instruct-2509-{bits}bit",
        parameters=_PARAMS_8B,
        quantization=f"{bits}-bit",
        size_bytes=_estimate(_PARAMS_8B, bits + 0.5),
        kv_bytes_per_token=_KV_8B,
        family="community MLX",
        source=source,
        evidence=evidence,
    )


PUBLISHED: tuple[PublishedModel, ...] = (
    _official_mlx("0.5B", 4),
    _official_mlx("1.5B", 3),
    _official_mlx("1.5B", 4),
    _official_mlx("4B", 3),
    _official_mlx(
        "4B",
        4,
        size_bytes=int(2.6e9),
        extra="; also downloaded by name in other public projects, one of which gives its size as 2.6 GB",
    ),
    _official_mlx("4B", 6),
    _community_8b(
        4,
        "https://huggingface.co/mlx-community/Apertus-8B-Instruct-2509-4bit",
        "loaded by name with mlx_lm.load in several public GitHub projects, one pinning commit c5e6ae2e",
    ),
    _community_8b(
        6,
        "https://huggingface.co/mlx-community/Apertus-8B-Instruct-2509-6bit",
        "named in public GitHub benchmark scripts, one pinning commit a2bfd2b2",
    ),
    _community_8b(
        8,
        "https://huggingface.co/mlx-community/Apertus-8B-Instruct-2509-8bit",
        "linked from a public GitHub README as converted from swiss-ai/Apertus-8B-Instruct-2509",
    ),
    PublishedModel(
        repo_id="swiss-ai/Apertus-8B-Instruct-2509",
        parameters=_PARAMS_8B,
        quantization="BF16",
        size_bytes=_estimate(_PARAMS_8B, 16),
        kv_bytes_per_token=_KV_8B,
        family="original",
        source="https://featherless.ai/models/swiss-ai/Apertus-8B-Instruct-2509",
        evidence="the model's page (Hugging Face card mirrored); third-party cards give ~16 GB in BF16",
    ),
    PublishedModel(
        repo_id="swiss-ai/Apertus-70B-Instruct-2509",
        parameters=_PARAMS_70B,
        quantization="BF16",
        size_bytes=_estimate(_PARAMS_70B, 16),
        kv_bytes_per_token=_KV_70B,
        family="original",
        source="https://llmyourway.com/authors/swiss-ai",
        evidence="listed among swiss-ai's models with Apertus-8B-Instruct-2509 and Apertus-8B-2509",
    ),
    *(
        PublishedModel(
            repo_id=f"swiss-ai/Apertus-v1.1-{size}-Instruct",
            parameters=_PARAMS_V11[size],
            quantization="BF16",
            size_bytes=_estimate(_PARAMS_V11[size], 16),
            kv_bytes_per_token=_KV_V11[size],
            family="original",
            source=f"https://huggingface.co/swiss-ai/Apertus-v1.1-{size}-Instruct",
            evidence=f"{_HF_LISTING}; the base model of several published GGUF conversions",
        )
        for size in ("0.5B", "1.5B", "4B")
    ),
)


def original_of(model: PublishedModel, published: tuple[PublishedModel, ...] = PUBLISHED) -> PublishedModel | None:
    """The full-precision repository a quantized build was made from (same size, in `published`), if listed."""
    if model.convertible:
        return model
    return next((p for p in published if p.convertible and p.parameters == model.parameters), None)


@dataclass(frozen=True)
class LocalModel:
    """A model directory on this machine: described from its files, or the one-line reason it cannot be."""

    name: str
    path: Path
    origin: str  # "hub cache" or "converted"
    info: ModelInfo | None = None
    error: str | None = None

    @property
    def quantization(self) -> str:
        return self.info.quantization if self.info else "?"

    @property
    def size_bytes(self) -> int | None:
        return self.info.weights_bytes if self.info else None

    def fits(self, ram_bytes: int | None, context: int = FIT_CONTEXT) -> bool | None:
        if self.info is None or ram_bytes is None:
            return None
        return self.info.fits(ram_bytes, context)


def default_models_dir() -> Path:
    """Where the app's conversions go: `models` in the app's data folder (the platform's, or `$APERTUS_CHAT_HOME`)."""
    return data_dir() / "models"


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (the hub library reads it once, at import)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "huggingface" / "hub"


def local_models(models_dir: str | os.PathLike | None = None) -> list[LocalModel]:
    """Apertus models in the Hugging Face cache, then the conversions in `models_dir` (default: the app's)."""
    found = [*_cached_models(), *_converted_models(Path(models_dir) if models_dir else default_models_dir())]
    return found


def _cached_models() -> list[LocalModel]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(hub_cache_dir())
    except (CacheNotFound, OSError, ValueError):
        return []
    models = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        # The revision `main` points at, else the newest one on disk.
        revision = next((r for r in repo.revisions if "main" in r.refs), None)
        revision = revision or max(repo.revisions, key=lambda r: r.last_modified)
        path = Path(revision.snapshot_path)
        if _model_type(path) not in MODEL_TYPES:
            continue
        models.append(_describe(path, repo.repo_id, "hub cache"))
    return models


def _converted_models(models_dir: Path) -> list[LocalModel]:
    if not models_dir.is_dir():
        return []
    return [
        _describe(path, path.name, "converted")
        for path in sorted(models_dir.iterdir(), key=lambda p: p.name.lower())
        # Hidden entries are a conversion still being written (or one that was cut off): never a model.
        if path.is_dir() and not path.name.startswith(".")
    ]


def _model_type(path: Path) -> str | None:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def _describe(path: Path, name: str, origin: str) -> LocalModel:
    try:
        return LocalModel(name, path, origin, info=describe_model(path, name=name))
    except Exception as e:  # a broken directory is listed with its reason, never a crash
        lines = str(e).strip().splitlines()
        return LocalModel(name, path, origin, error=lines[0] if lines else type(e).__name__)


def total_ram_bytes() -> int | None:
    """This machine's physical memory (macOS and Linux), or None when the OS will not say."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def fit_label(fits: bool | None) -> str:
    return "?" if fits is None else "yes" if fits else "no"


def format_size(size_bytes: float | None, estimated: bool = False) -> str:
    """ "16.1 GB", "~2.3 GB", "850 MB" (decimal units, as macOS shows sizes)."""
    if size_bytes is None:
        return "?"
    text = f"{size_bytes / 1e9:.1f} GB" if size_bytes >= 1e9 else f"{size_bytes / 1e6:.0f} MB"
    return f"~{text}" if estimated else text


def ram_gb_for(ram_bytes: int) -> float:
    """The `--ram-gb` value for a machine with `ram_bytes` of memory (GB of 1e9 bytes, rounded down)."""
    return math.floor(ram_bytes / 1e7) / 100


def conversion_dir(repo_id: str, ram_gb: float, models_dir: str | os.PathLike | None = None) -> Path:
    """Where a `budget` conversion of `repo_id` to `ram_gb` goes: `<models dir>/<repo-name>-budget-<N>gb`."""
    name = repo_id.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return (Path(models_dir) if models_dir else default_models_dir()) / f"{name}-budget-{ram_gb:g}gb"
