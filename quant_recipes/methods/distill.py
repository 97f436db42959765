"""Distilled scales: keep a calibrated method's integer codes, then fit the per-group scales and biases.

With the codes q fixed, Ŵ = q * s + b (per group) is linear in s and b, so the layer's output error on the
calibration inputs, ||X W^T - X Ŵ^T||² = sum over rows of e H e^T (e = w - ŵ, H = X^T X), is a convex
quadratic in them. Rather than gradient descent, we minimise it exactly one group at a time (block
coordinate descent): a group's best (s, b) given all the others is a 2x2 linear solve per output row, and
one sweep over the groups costs about as much as one gradient step. A few sweeps converge where Adam needed
hundreds of steps, each step never raises the loss, and no learning rate needs tuning.

The codes come from GPTQ when the Hessian was collected, else from the AWQ clip search (the fit then uses
the input sample's X^T X).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import awq, gptq
from .affine import check_shape, need_stats, pack_affine, round_to_grid
from .base import METHODS, LinearStats, QuantizedWeight, Target, rtn

SWEEPS = 6


def start_codes(weight: mx.array, target: Target, stats: LinearStats) -> tuple[np.ndarray, ...]:
    """Integer codes, scales and biases to start from: GPTQ's if there is a Hessian, else AWQ's."""
    if stats.hessian is not None:
        return gptq.gptq_codes(weight, target, np.array(stats.hessian))
    scales, biases = awq.clipped_grid(weight, target, np.array(stats.sample.astype(mx.float32)))
    gs, w = target.group_size, np.array(weight.astype(mx.float32))
    codes = round_to_grid(w, np.repeat(scales, gs, axis=1), np.repeat(biases, gs, axis=1), target.bits)
    return codes, scales, biases


def fit_scales(
    w: np.ndarray, codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, hessian: np.ndarray, group_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scales and biases (out, groups) that minimise sum_rows e H e^T, e = w - (codes * s + b), codes fixed."""
    scales, biases = scales.copy(), biases.copy()
    e = w - (codes * np.repeat(scales, group_size, axis=1) + np.repeat(biases, group_size, axis=1))
    grad = e @ hessian  # H e per row; kept current as groups change
    for _ in range(SWEEPS):
        for g in range(scales.shape[1]):
            cols = slice(g * group_size, (g + 1) * group_size)
            q, h = codes[:, cols], hessian[cols, cols]
            # Changing (s, b) by (ds, db) moves ŵ_g by d = ds q + db and the loss by d H_gg d^T - 2 d (H e)_g.
            qh = q @ h
            a_ss, a_sb, a_bb = (qh * q).sum(axis=1), qh.sum(axis=1), h.sum()
            r_s, r_b = (q * grad[:, cols]).sum(axis=1), grad[:, cols].sum(axis=1)
            det = a_ss * a_bb - a_sb**2
            # Singular when a group's codes are all equal (s and b do the same thing) or its inputs are
            # dead (no information): then move the bias alone, or nothing.
            solvable = det > 1e-6 * a_ss * a_bb
            safe_det = np.where(solvable, det, 1.0)
            ds = np.where(solvable, (a_bb * r_s - a_sb * r_b) / safe_det, 0.0)
            db_alone = r_b / a_bb if a_bb > 0 else np.zeros_like(r_b)
            db = np.where(solvable, (a_ss * r_b - a_sb * r_s) / safe_det, db_alone)
            scales[:, g] += ds
            biases[:, g] += db
            grad -= (ds[:, None] * q + db[:, None]) @ hessian[cols, :]
    return scales, biases


def quantize(weight: mx.array, target: Target, stats: LinearStats | None) -> QuantizedWeight:
    """GPTQ (or AWQ) codes with scales and biases fitted to the calibration inputs."""
    if target.mode != "affine":
        # mxfp4/nvfp4 scales are powers of two (or fp8) with no bias: nothing continuous to fit here.
        return rtn(weight, target, stats)
    check_shape(weight, target)
    need_stats("distill", stats, "the input Hessian or a sample of input rows")
    codes, scales, biases = start_codes(weight, target, stats)
    if stats.hessian is not None:
        hessian = np.array(stats.hessian)
    else:
        sample = np.array(stats.sample.astype(mx.float32))
        hessian = sample.T @ sample
    w = np.array(weight.astype(mx.float32))
    scales, biases = fit_scales(w, codes, scales, biases, hessian.astype(np.float32), target.group_size)
    return pack_affine(codes, scales, biases, target, weight.dtype)


METHODS["distill"] = quantize
