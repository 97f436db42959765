"""Convert a full-precision Apertus checkpoint by a recipe, and report the quality that survived."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from apertus_mlx import __version__, formats
from apertus_mlx.load import load_config, load_model, load_tokenizer, resolve
from apertus_mlx.model import Model, ModelArgs
from apertus_mlx.progress import ProgressCallback
from apertus_mlx.save import save_model

from . import budget as budgets
from .calibration import default_texts, read_text, token_sequences
from .methods import METHODS
from .pipeline import Plan, Progress, bits_per_weight, packed_bytes, quantize_model, weight_shapes
from .recipe import Recipe

# Importing the calibrated methods registers them in METHODS.
for _module in ("gptq", "awq", "distill"):
    with contextlib.suppress(ModuleNotFoundError):
        __import__(f"quant_recipes.methods.{_module}")


def convert(
    source: str | os.PathLike,
    recipe: Recipe,
    out_dir: str | os.PathLike,
    calibration_text: str | os.PathLike | None = None,
    evaluation_text: str | os.PathLike | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    eval_sequences: int = 16,
    download_progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Quantize `source` by `recipe` into `out_dir` (written atomically) with `quality.json` and `QUALITY.md`.

    `progress` wraps each pass over the layers; `download_progress`, when given, receives the download of a
    hub `source` instead of the hub's own progress bars.
    """
    start = time.perf_counter()
    src = resolve(source, progress=download_progress)
    if fmt := formats.detect(src):
        raise ValueError(
            f"{src} is already quantized ({fmt.upper()}); convert it without --recipe to save it as MLX as it is, "
            "or quantize from the full-precision checkpoint"
        )
    config = load_config(src)
    if "quantization" in config:
        raise ValueError(f"{src} is already quantized; convert from the full-precision checkpoint")
    tokenizer = load_tokenizer(src, config)
    default_calibration, default_evaluation = default_texts()
    calib_text = read_text(calibration_text) if calibration_text else default_calibration
    eval_text = read_text(evaluation_text) if evaluation_text else default_evaluation
    calibration = token_sequences(tokenizer, calib_text, **_calibration_shape(recipe), what="calibration")
    length = recipe.calibration["sequence_length"]
    evaluation = token_sequences(tokenizer, eval_text, eval_sequences, length, what="evaluation")

    model = _load_bf16(src)
    parameters = sum(a.size for _, a in tree_flatten(model.parameters()))
    shapes = weight_shapes(model)
    plan: Plan = {p: recipe.assign(p, len(model.layers)) for p in shapes}
    for path, assignment in plan.items():
        if assignment.quantized and assignment.method not in METHODS:
            raise ValueError(f"recipe {recipe.name}: method {assignment.method!r} (for {path}) is not available")
    if recipe.budget is not None:
        plan = _allocate_budget(src, recipe, plan, shapes, parameters, calibration, progress)

    warnings = _calibration_warnings(plan, shapes, calibration) if recipe.needs_calibration else []
    metrics = quantize_model(model, plan, calibration if recipe.needs_calibration else None, evaluation, progress)
    report = {
        "recipe": recipe.name,
        "recipe_hash": recipe.content_hash,
        "source": str(source),
        "bits_per_weight": bits_per_weight(model, parameters),
        "parameters": parameters,
        **metrics,
        "calibration_tokens": int(calibration.size) if recipe.needs_calibration else 0,
        "layers": budgets.assignments_summary(plan),
        "budget": recipe.budget.target if recipe.budget else None,
        "tool": f"apertus-mlx {__version__}",
        "warnings": warnings,
    }
    config = dict(config, quantization_recipe=_recipe_record(recipe))
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16"

    def write_reports(directory: Path) -> None:
        report["size_bytes"] = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        report["conversion_seconds"] = round(time.perf_counter() - start, 2)
        (directory / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
        (directory / "QUALITY.md").write_text(quality_markdown(report))

    save_model(out_dir, model, config, copy_from=src, overwrite=overwrite, before_commit=write_reports)
    return report


# The published Apertus-8B shape, for estimating a recipe's size without any weights.
APERTUS_8B = {
    "model_type": "apertus",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "intermediate_size": 21504,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 131072,
    "rope_theta": 12_000_000.0,
}


def estimated_bpw(recipe: Recipe, config: dict[str, Any] = APERTUS_8B) -> float | None:
    """Bits per weight the recipe gives a model of this config (None for budgets: they aim at a target)."""
    if recipe.budget is not None:
        return None
    model = Model(ModelArgs.from_config(config))  # never evaluated: only shapes are read
    shapes = weight_shapes(model)
    parameters = sum(a.size for _, a in tree_flatten(model.parameters()))
    weights = sum(packed_bytes(shape, recipe.assign(p, len(model.layers))) for p, shape in shapes.items())
    others = parameters - sum(o * i for o, i in shapes.values())
    return (weights + 2 * others) * 8 / parameters


def _load_bf16(src: Path) -> Any:
    # Recipes start from the checkpoint's 16-bit weights; float32 sources are rounded to bf16 first.
    model = load_model(src, lazy=True)
    if model.model.norm.weight.dtype == mx.float32:
        model.set_dtype(mx.bfloat16)
    return model


def _calibration_warnings(plan: Plan, shapes: dict[str, tuple[int, int]], calibration: mx.array) -> list[str]:
    """Calibrated methods fit per-layer statistics; with fewer tokens than inputs they fit the sample, not the model."""
    widths = [shapes[p][1] for p, a in plan.items() if a.quantized and a.method != "rtn"]
    if not widths or calibration.size >= 2 * max(widths):
        return []
    return [
        f"only {calibration.size} calibration tokens for layers with up to {max(widths)} inputs; calibrated methods "
        f"may overfit them: pass --calibration-text with at least {4 * max(widths)} tokens of representative text"
    ]


def _calibration_shape(recipe: Recipe) -> dict[str, int]:
    return {"count": recipe.calibration["sequences"], "length": recipe.calibration["sequence_length"]}


def _allocate_budget(src, recipe, plan, shapes, parameters, calibration, progress) -> Plan:
    measured = _load_bf16(src)  # a second lazy copy, which the measurement consumes layer by layer
    a = measured.args
    kv_per_token = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * 2  # keys and values in 16 bits
    target = budgets.target_bytes(recipe.budget, parameters, kv_per_token)
    module_parameters = sum(o * i for o, i in shapes.values())
    other = (parameters - module_parameters) * 2  # norms and xIELU scalars stay in bf16
    widths = recipe.budget.widths(recipe.group_size)
    errors = budgets.measure_sensitivity(measured, plan, calibration, widths, progress)
    return budgets.allocate(plan, shapes, errors, target - other)


def _recipe_record(recipe: Recipe) -> dict[str, Any]:
    record = {
        "name": recipe.name,
        "content_sha256": recipe.content_hash,
        "tool": f"apertus-mlx {__version__}",
        # Calibrated methods still write mlx-lm's affine layout, so both runtimes read every output.
        "readable_by": ["apertus-mlx", "mlx-lm"],
    }
    if recipe.budget is not None:
        record["budget"] = recipe.budget.target  # the command line may have aimed it elsewhere than its file
    return record


def quality_markdown(report: dict[str, Any]) -> str:
    r = report
    rows = [
        ("bits per weight (scales and biases included)", f"{r['bits_per_weight']:.3f}"),
        ("size on disk", f"{r.get('size_bytes', 0) / 1e6:.1f} MB"),
        ("KL divergence to the original (nats/token)", f"{r['kl_divergence']:.5f}"),
        ("top-1 agreement with the original", f"{100 * r['top1_agreement']:.2f}%"),
        ("perplexity: original -> quantized", f"{r['perplexity_original']:.3f} -> {r['perplexity_quantized']:.3f}"),
        ("evaluation tokens", f"{r['evaluation_tokens']}"),
        ("calibration tokens", f"{r['calibration_tokens']}"),
        *((("size target", r["budget"]),) if r.get("budget") else ()),
        ("layers", ", ".join(f"{n} x {k}" for k, n in r["layers"].items())),
        ("conversion time", f"{r['conversion_seconds']:.1f} s"),
        *(("warning", w) for w in r["warnings"]),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        f"# Quality report: recipe `{r['recipe']}`\n\n"
        f"Source: `{r['source']}`; recipe hash `{r['recipe_hash']}`; made by {r['tool']}.\n\n"
        f"| measure | value |\n|---|---|\n{table}\n\n"
        "KL divergence and top-1 agreement compare next-token distributions of the quantized model with the "
        "original (bf16) on held-out text that calibration never saw.\n"
    )


def tqdm_progress(iterable: Iterator[Any], description: str, total: int) -> Iterator[Any]:
    """Progress bars on stderr."""
    from tqdm import tqdm

    return iter(tqdm(iterable, desc=description, total=total, unit="layer"))
