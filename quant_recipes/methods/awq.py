"""Activation-aware clipping: shrink each group's range where that lowers the error the layer's real inputs see.

Min-max rounding spends the grid on the group's extremes; clipping them makes the steps finer for all the
other weights. Which wins depends on the inputs, so for every (output row, input group) we try ratios
1.0 .. 0.5 of the group's [min, max] and keep the one with the least output error ||X_g (w_g - ŵ_g)^T||²
on the calibration sample (Lin et al., 2023, "AWQ", clipping search).

AWQ's other half, activation-aware *scaling* (multiply salient input channels up, divide the preceding
norm's gain down), changes the layer before, so the pipeline does it (`quant_recipes/scaling.py`) before
this clip search sees the weights.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .affine import affine_grid, check_shape, need_stats, pack_affine, round_to_grid
from .base import METHODS, LinearStats, QuantizedWeight, Target, rtn

RATIOS = np.linspace(1.0, 0.5, 21)  # steps of 2.5% of the range


def group_grams(sample: np.ndarray, group_size: int) -> np.ndarray:
    """X_g^T X_g for every input group g, shape (groups, group_size, group_size).

    The output error of one group's weights, ||X_g e^T||², equals e X_g^T X_g e^T, so these small
    matrices stand in for the whole sample.
    """
    xg = sample.reshape(sample.shape[0], -1, group_size).transpose(1, 0, 2)
    return xg.transpose(0, 2, 1) @ xg


def clipped_grid(weight: mx.array, target: Target, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group scales and biases (out, in / group_size), as stored, with the best clip ratio each."""
    gs, bits = target.group_size, target.bits
    w = np.array(weight.astype(mx.float32))
    wg = w.reshape(w.shape[0], -1, gs).transpose(1, 0, 2)  # (groups, out, gs)
    grams = group_grams(sample, gs)
    low, high = wg.min(axis=-1), wg.max(axis=-1)

    best_err = np.full(low.shape, np.inf, dtype=np.float32)
    best_scale = np.zeros_like(best_err)
    best_bias = np.zeros_like(best_err)
    for ratio in RATIOS:
        scale, bias = affine_grid(low * ratio, high * ratio, bits, weight.dtype)
        codes = round_to_grid(wg, scale[..., None], bias[..., None], bits)
        e = wg - (codes * scale[..., None] + bias[..., None])
        err = ((e @ grams) * e).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_bias = np.where(better, bias, best_bias)
    return best_scale.T, best_bias.T


def quantize(weight: mx.array, target: Target, stats: LinearStats | None) -> QuantizedWeight:
    """Round to nearest on per-group ranges clipped to minimise the output error; needs `stats.sample`."""
    if target.mode != "affine":
        # mxfp4/nvfp4 have no bias and a fixed float grid: a clip search for them is not written yet.
        return rtn(weight, target, stats)
    check_shape(weight, target)
    need_stats("awq", stats, "a sample of input rows")
    scales, biases = clipped_grid(weight, target, np.array(stats.sample.astype(mx.float32)))
    gs, w = target.group_size, np.array(weight.astype(mx.float32))
    codes = round_to_grid(w, np.repeat(scales, gs, axis=1), np.repeat(biases, gs, axis=1), target.bits)
    return pack_affine(codes, scales, biases, target, weight.dtype)


METHODS["awq"] = quantize
