"""Activation-aware scaling: move quantization difficulty from a layer's weights into the RMSNorm before it.

An input channel that carries large activations makes its weights' rounding errors count for more. Scaling
those weight columns up by s (and the norm's gain down by s, so the layer computes the same function) gives
them finer steps on the quantization grid, at the cost of coarser steps for the rest. For each norm and the
projections it feeds, we try s = mean|x|^a for a in [0, 1) and keep the one with the least output error
of the rounded weights on the calibration sample (Lin et al., 2023, "AWQ", scale search). a = 0 is plain
rounding, so the search never does worse than that on the sample.

In Apertus the attention norm feeds q/k/v and the MLP norm feeds up_proj. down_proj's input comes through
xIELU, which does not commute with a scale, and o_proj's from v_proj through attention mixing heads that GQA
shares, so those two are left to the clip search alone.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .methods import METHODS, LinearStats, Target
from .recipe import Assignment

GRID = 20
# norm -> the projections it feeds, relative to a decoder layer
GROUPS = {
    "attention_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "feedforward_layernorm": ("mlp.up_proj",),
}
SCALED_METHODS = {"awq"}


def rounding_error(x: mx.array, w: mx.array, s: mx.array, assignment: Assignment) -> float:
    """||X W^T - (X / s) Q(W s)^T||^2: the output error of rounding the scaled weights."""
    target = Target(assignment.bits, assignment.group_size, assignment.mode)
    q = METHODS["rtn"](w * s, target, None)
    w_hat = mx.dequantize(q.weight, q.scales, q.biases, target.group_size, target.bits, mode=target.mode)
    diff = x @ w.T - (x / s) @ w_hat.T
    return (diff * diff).sum().item()


def search_scale(x: mx.array, weights: list[mx.array], assignments: list[Assignment]) -> mx.array:
    """The per-input-channel scale (in_features,) that minimises the summed rounding error of `weights`."""
    mean = mx.abs(x).mean(axis=0) + 1e-6
    best, best_scale = float("inf"), mx.ones_like(mean)
    for i in range(GRID):
        s = mean ** (i / GRID)
        s = s / mx.sqrt(s.max() * s.min())  # centre the scales so neither the norm nor the weights drift
        err = sum(rounding_error(x, w, s, a) for w, a in zip(weights, assignments, strict=True))
        if err < best:
            best, best_scale = err, s
    return best_scale


def scale_layer(layer: nn.Module, prefix: str, plan: dict[str, Assignment], stats: dict[str, LinearStats]) -> None:
    """Fold searched scales into `layer`'s norms and projections, and rescale their statistics to match."""
    for norm_name, names in GROUPS.items():
        paths = [f"{prefix}.{n}" for n in names]
        if not all(plan[p].quantized and plan[p].method in SCALED_METHODS and plan[p].mode == "affine" for p in paths):
            continue
        linears = [_get(layer, n) for n in names]
        weights = [m.weight.astype(mx.float32) for m in linears]
        x = stats[paths[0]].sample  # the projections share one input
        s = search_scale(x, weights, [plan[p] for p in paths])
        norm = getattr(layer, norm_name)
        norm.weight = (norm.weight.astype(mx.float32) / s).astype(norm.weight.dtype)
        for m, w, p in zip(linears, weights, paths, strict=True):
            m.weight = (w * s).astype(m.weight.dtype)
            stats[p].rescale(1 / s)
        mx.eval(norm.weight, *[m.weight for m in linears])


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module
