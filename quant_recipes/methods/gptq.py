"""GPTQ: round one input column at a time and push its rounding error onto the columns not yet rounded.

The error of column j, scaled by the inverse Hessian of the layer's inputs, is the least-squares correction
of the remaining columns (Frantar et al., 2022, "GPTQ"). Columns go in their natural order so that every
group of `group_size` consecutive inputs is finished before the next starts, which keeps MLX's group layout;
each group's scale and bias are fixed from the (already corrected) weights when the group starts.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .affine import affine_grid, check_shape, need_stats, pack_affine, round_to_grid
from .base import METHODS, LinearStats, QuantizedWeight, Target, rtn

DAMPING = 0.01  # of the mean Hessian diagonal: keeps the inverse well conditioned
BLOCK = 128  # columns updated together before the error is pushed to the rest (lazy batch update)


def inverse_hessian_factor(hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor U of the damped inverse Hessian (H^-1 = U^T U) and the dead-input mask.

    Inputs that never fired (zero diagonal) carry no error information: they get a unit diagonal so H
    stays invertible, and their weights are free (the caller zeroes them).
    """
    h = hessian.astype(np.float32).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += DAMPING * np.mean(np.diag(h))
    lower = np.linalg.cholesky(np.linalg.inv(h))
    return lower.T.copy(), dead


def gptq_codes(weight: mx.array, target: Target, hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ integer codes (out, in) and per-group scales, biases (out, in / group_size) as stored."""
    w = np.array(weight.astype(mx.float32))
    rows, cols = w.shape
    gs, bits = target.group_size, target.bits
    u, dead = inverse_hessian_factor(hessian)
    w[:, dead] = 0.0

    codes = np.zeros((rows, cols), dtype=np.float32)
    scales = np.zeros((rows, cols // gs), dtype=np.float32)
    biases = np.zeros_like(scales)
    block = max(gs, BLOCK // gs * gs)  # whole groups per block, so a group's weights are all current
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        wb = w[:, start:stop]  # a view: corrections land in w
        err = np.zeros_like(wb)
        ub = u[start:stop, start:stop]
        for j in range(stop - start):
            col = start + j
            if col % gs == 0:
                group = wb[:, j : j + gs]
                scale, bias = affine_grid(group.min(axis=1), group.max(axis=1), bits, weight.dtype)
                scales[:, col // gs], biases[:, col // gs] = scale, bias
            q = round_to_grid(wb[:, j], scale, bias, bits)
            codes[:, col] = q
            err[:, j] = (wb[:, j] - (q * scale + bias)) / ub[j, j]
            wb[:, j + 1 :] -= np.outer(err[:, j], ub[j, j + 1 :])
        w[:, stop:] -= err @ u[start:stop, stop:]
    return codes, scales, biases


def quantize(weight: mx.array, target: Target, stats: LinearStats | None) -> QuantizedWeight:
    """GPTQ for MLX's affine format; needs `stats.hessian`."""
    if target.mode != "affine":
        # mxfp4/nvfp4 share one scale per group and no bias, on a fixed float grid; GPTQ for them is
        # not written yet, so they get plain rounding.
        return rtn(weight, target, stats)
    check_shape(weight, target)
    need_stats("gptq", stats, "the input Hessian")
    if stats.hessian is None:
        raise ValueError("gptq needs LinearStats(want_hessian=True)")
    codes, scales, biases = gptq_codes(weight, target, np.array(stats.hessian))
    return pack_affine(codes, scales, biases, target, weight.dtype)


METHODS["gptq"] = quantize
