"""The affine grid shared by the calibrated methods: scales and biases as stored, codes, and MLX's packing."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .base import LinearStats, QuantizedWeight, Target


def check_shape(weight: mx.array, target: Target) -> None:
    """Refuse shapes `mx.quantize` refuses, with the reason."""
    if weight.ndim != 2 or weight.shape[1] % target.group_size:
        raise ValueError(f"weight {weight.shape} must be 2-D with in_features a multiple of {target.group_size}")


def need_stats(method: str, stats: LinearStats | None, what: str) -> None:
    """Calibrated methods cannot run without what the layer saw during calibration."""
    if stats is None or stats.rows == 0:
        raise ValueError(f"{method} needs calibration statistics ({what}); use 'rtn' for uncalibrated layers")


def as_stored(values: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """`values` as they will read back after storing them in `dtype` (scales/biases take the weight's dtype)."""
    return np.array(mx.array(values).astype(dtype).astype(mx.float32))


def affine_grid(low: np.ndarray, high: np.ndarray, bits: int, dtype: mx.Dtype) -> tuple[np.ndarray, np.ndarray]:
    """Scale and bias whose 2^bits levels span [low, high] exactly, as stored in `dtype`."""
    scale = (high - low) / (2**bits - 1)
    # A constant group needs no steps; any positive scale then keeps it exact at code 0.
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return as_stored(scale, dtype), as_stored(low.astype(np.float32), dtype)


def round_to_grid(w: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int) -> np.ndarray:
    """Nearest integer code of `w` on the grid bias + scale * q, q in [0, 2^bits - 1]."""
    return np.clip(np.rint((w - bias) / scale), 0, 2**bits - 1)


def pack_affine(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, target: Target, dtype: mx.Dtype):
    """Pack integer codes (out, in) and per-group scales/biases (out, in / group_size) exactly as `mx.quantize`.

    MLX stores the codes of a row as one little-endian bit stream, `bits` bits per code, in uint32 words
    (for every bit width, including 3, 5 and 6).
    """
    rows, cols = codes.shape
    if cols * target.bits % 32:
        raise ValueError(f"{cols} codes of {target.bits} bits do not fill whole uint32 words")
    shifts = np.arange(target.bits, dtype=np.uint8)
    stream = (codes.astype(np.uint8)[..., None] >> shifts) & 1
    packed = np.packbits(stream.reshape(rows, -1), axis=-1, bitorder="little")
    words = np.ascontiguousarray(packed).view("<u4")
    return QuantizedWeight(
        mx.array(words.astype(np.uint32)),
        mx.array(np.ascontiguousarray(scales, dtype=np.float32)).astype(dtype),
        mx.array(np.ascontiguousarray(biases, dtype=np.float32)).astype(dtype),
    )
