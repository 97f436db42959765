"""Quantize a model layer by layer, measuring its quality against the original on the way.

One pass over the decoder layers carries three streams of hidden states: calibration text through
the layers already quantized (what each layer's inputs will be), and evaluation text through both
the original and the quantized layers. A layer's full-precision weights are read when it is reached
and released once its quantized replacement is in place, so memory stays near the output's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from apertus_mlx.model import Model

from .methods import METHODS, LinearStats, QuantizedWeight, Target
from .recipe import Assignment
from .scaling import scale_layer

Plan = dict[str, Assignment]
Progress = Callable[[Iterator[Any], str, int], Iterator[Any]]


def quantizable_modules(model: Model) -> dict[str, nn.Module]:
    """Every module a recipe can quantize, by its recipe path: the linears, the embedding and the head.

    Recipes, plans and reports name the decoder's modules `model.*` (`model.layers.3.mlp.up_proj`,
    `model.embed_tokens`), as Apertus 1 lays them out, whatever the checkpoint calls them: Apertus 1.5's full
    model keeps its decoder under `model.language_model.*`. `module_path` maps a recipe path back.
    """
    decoder = f"{model.decoder_prefix}."
    return {
        "model." + p[len(decoder) :] if p.startswith(decoder) else p: m
        for p, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding))
    }


def module_path(model: Model, path: str) -> str:
    """Where the module of a recipe path (see `quantizable_modules`) is in `model`."""
    return model.decoder_prefix + path[len("model") :] if path.startswith("model.") else path


def weight_shapes(model: Model) -> dict[str, tuple[int, int]]:
    """(out, in) of every quantizable module's weight, by path.

    Shapes rather than the modules themselves: holding an original module after it is replaced would keep its
    full-precision weight alive, and a conversion's memory would grow by the whole source.
    """
    return {p: tuple(m.weight.shape) for p, m in quantizable_modules(model).items()}


def packed_bytes(shape: tuple[int, int], assignment: Assignment, dtype_bytes: int = 2) -> int:
    """Bytes an (out, in) weight takes under `assignment` (packed values plus per-group scales and biases)."""
    out_dim, in_dim = shape
    if not assignment.quantized:
        return out_dim * in_dim * dtype_bytes
    groups = out_dim * (in_dim // assignment.group_size)
    per_group = 2 * dtype_bytes if assignment.mode == "affine" else 1  # scale+bias, or one shared exponent
    return out_dim * in_dim * assignment.bits // 8 + groups * per_group


def bits_per_weight(model: nn.Module, parameters: int) -> float:
    """Stored bits (scales and biases included) per original parameter."""
    return sum(a.nbytes for _, a in tree_flatten(model.parameters())) * 8 / parameters


class _Recorder(nn.Module):
    """Stands in for a linear layer during calibration: notes its inputs, then applies it."""

    def __init__(self, inner: nn.Module, stats: LinearStats):
        super().__init__()
        self.inner = inner
        self._stats = stats

    def __call__(self, x: mx.array) -> mx.array:
        self._stats.update(x)
        return self.inner(x)


@dataclass
class Streams:
    calibration: mx.array | None  # (sequences, length, hidden) through the quantized layers so far
    original: mx.array  # evaluation text through the original layers
    quantized: mx.array  # evaluation text through the quantized layers


def run_layer(layer: nn.Module, h: mx.array, chunk: int = 8) -> mx.array:
    outs = []
    for i in range(0, h.shape[0], chunk):
        outs.append(layer(h[i : i + chunk], "causal", None))
        mx.eval(outs[-1])
    return mx.concatenate(outs)


def layer_linears(layer: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    return {f"{prefix}.{p}": m for p, m in layer.named_modules() if isinstance(m, nn.Linear)}


def collect_stats(layer: nn.Module, prefix: str, h: mx.array, want_hessian: bool) -> dict[str, LinearStats]:
    """Input statistics of every linear in `layer` over the calibration states `h`."""
    linears = layer_linears(layer, prefix)
    stats = {p: LinearStats(m.weight.shape[1], want_hessian=want_hessian) for p, m in linears.items()}
    parents = {p: (layer, p[len(prefix) + 1 :].split(".")) for p in linears}
    for path, (root, parts) in parents.items():
        parent = root
        for part in parts[:-1]:
            parent = getattr(parent, part)
        setattr(parent, parts[-1], _Recorder(getattr(parent, parts[-1]), stats[path]))
    try:
        run_layer(layer, h)
    finally:
        for root, parts in parents.values():
            parent = root
            for part in parts[:-1]:
                parent = getattr(parent, part)
            setattr(parent, parts[-1], getattr(parent, parts[-1]).inner)
    return stats


def quantize_linear(linear: nn.Linear, assignment: Assignment, stats: LinearStats | None) -> nn.Module:
    """The quantized replacement of `linear` made by the assignment's method."""
    if not assignment.quantized:
        return linear
    target = Target(assignment.bits, assignment.group_size, assignment.mode)
    method = METHODS[assignment.method]
    # Round-to-nearest quantizes the stored 16-bit weight, as mlx-lm does; a float32 copy of an 8B head is 2 GB.
    weight = linear.weight if assignment.method == "rtn" else linear.weight.astype(mx.float32)
    result: QuantizedWeight = method(weight, target, stats)
    out_dim, in_dim = linear.weight.shape
    has_bias = "bias" in linear
    q = nn.QuantizedLinear(in_dim, out_dim, has_bias, target.group_size, target.bits, mode=target.mode)
    q.weight = result.weight
    q.scales = result.scales.astype(linear.weight.dtype) if target.mode == "affine" else result.scales
    if result.biases is not None:
        q.biases = result.biases.astype(linear.weight.dtype)
    if has_bias:
        q.bias = linear.bias
    mx.eval(q.parameters())
    return q


def quantize_embedding(embedding: nn.Embedding, assignment: Assignment) -> nn.Module:
    # A lookup table has no inputs to calibrate on: round to nearest.
    if not assignment.quantized:
        return embedding
    q = embedding.to_quantized(group_size=assignment.group_size, bits=assignment.bits, mode=assignment.mode)
    mx.eval(q.parameters())
    return q


def _replace(model: Model, path: str, module: nn.Module) -> None:
    """Put `module` at the recipe path `path` of `model`."""
    *parents, name = module_path(model, path).split(".")
    parent = model
    for part in parents:
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    setattr(parent, name, module)


def quantize_model(
    model: Model,
    plan: Plan,
    calibration: mx.array | None,
    evaluation: mx.array,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Quantize `model` in place by `plan`; returns quality metrics on `evaluation` (sequences of token ids).

    `calibration` (sequences of token ids) is needed when a method of the plan uses statistics.
    """
    calibrated = any(a.quantized and a.method != "rtn" for a in plan.values())
    if calibrated and calibration is None:
        raise ValueError("calibrated methods need calibration text")
    want_hessian = any(a.quantized and a.method in ("gptq", "distill") for a in plan.values())
    inner = model.model
    original_embed = inner.embed_tokens
    q_embed = quantize_embedding(original_embed, plan["model.embed_tokens"])
    streams = Streams(
        calibration=q_embed(calibration) if calibrated else None,
        original=original_embed(evaluation),
        quantized=q_embed(evaluation),
    )
    mx.eval(streams.original, streams.quantized, streams.calibration)
    _replace(model, "model.embed_tokens", q_embed)
    if not model.args.tie_word_embeddings:
        original_embed = None  # release the full-precision table now; only a tied head needs it again

    layers = range(len(model.layers))
    for i in progress(layers, "quantizing layers", len(layers)) if progress else layers:
        layer = model.layers[i]
        prefix = f"model.layers.{i}"
        streams.original = run_layer(layer, streams.original)
        stats = {}
        if calibrated:
            stats = collect_stats(layer, prefix, streams.calibration, want_hessian)
            scale_layer(layer, prefix, plan, stats)  # the original stream has passed this layer already
        for path, linear in layer_linears(layer, prefix).items():
            assignment = plan[path]
            needs = assignment.quantized and assignment.method != "rtn"
            _replace(model, path, quantize_linear(linear, assignment, stats.get(path) if needs else None))
        streams.quantized = run_layer(layer, streams.quantized)
        if calibrated:
            streams.calibration = run_layer(layer, streams.calibration)

    original = inner.norm(streams.original)
    quantized = inner.norm(streams.quantized)
    if model.args.tie_word_embeddings:
        original_head, quantized_head = original_embed.as_linear, q_embed.as_linear
    else:
        head_stats = None
        if calibrated and plan["lm_head"].quantized and plan["lm_head"].method != "rtn":
            head_stats = LinearStats(model.lm_head.weight.shape[1], want_hessian=want_hessian)
            head_stats.update(inner.norm(streams.calibration))
        q_head = quantize_linear(model.lm_head, plan["lm_head"], head_stats)
        original_head, quantized_head = model.lm_head, q_head
    metrics = compare_logits(original, quantized, original_head, quantized_head, evaluation)
    if not model.args.tie_word_embeddings:
        model.lm_head = q_head
    return metrics


class LogitComparison:
    """Running KL(original || quantized) of next-token distributions, top-1 agreement and both perplexities."""

    def __init__(self) -> None:
        self.kl = self.agree = self.nll_original = self.nll_quantized = 0.0
        self.count = 0

    def update(self, original_logits: mx.array, quantized_logits: mx.array, tokens: mx.array) -> None:
        """Add one batch: logits (batch, length, vocab) of both models for `tokens` (batch, length)."""
        lp = nn.log_softmax(original_logits.astype(mx.float32), axis=-1)[:, :-1]
        lq = nn.log_softmax(quantized_logits.astype(mx.float32), axis=-1)[:, :-1]
        targets = tokens[:, 1:, None]
        self.kl += (mx.exp(lp) * (lp - lq)).sum().item()
        self.agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
        self.nll_original -= mx.take_along_axis(lp, targets, axis=-1).sum().item()
        self.nll_quantized -= mx.take_along_axis(lq, targets, axis=-1).sum().item()
        self.count += targets.size

    def result(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {
            "kl_divergence": self.kl / n,
            "top1_agreement": self.agree / n,
            "perplexity_original": math.exp(self.nll_original / n),
            "perplexity_quantized": math.exp(self.nll_quantized / n),
            "evaluation_tokens": self.count,
        }


def compare_logits(
    original: mx.array,
    quantized: mx.array,
    original_head: Callable[[mx.array], mx.array],
    quantized_head: Callable[[mx.array], mx.array],
    tokens: mx.array,
    positions: int = 128,
) -> dict[str, float]:
    """Compare the two models' final hidden states (batch, length, hidden) through their heads.

    A window of `positions` tokens of one sequence at a time, each starting on the previous one's last token:
    float32 logits over a 131k vocabulary take 0.5 GB per thousand tokens, and the comparison holds several.
    """
    comparison = LogitComparison()
    for b in range(tokens.shape[0]):
        for start in range(0, tokens.shape[1] - 1, positions):
            window = (slice(b, b + 1), slice(start, start + positions + 1))
            comparison.update(original_head(original[window]), quantized_head(quantized[window]), tokens[window])
    return comparison.result()
