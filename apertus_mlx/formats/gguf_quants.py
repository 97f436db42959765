"""ggml quantized blocks unpacked into MLX's affine layout (w = scale * q + bias, q packed LSB-first into uint32).

Each ggml type is read, vectorized over all blocks of a tensor, into unsigned codes `q` with one scale and one
bias per group, such that scale * q + bias reproduces ggml's own dequantization in float32 bit for bit.
Groups of 32 (Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K) go into MLX as they are; MLX's quantized matmul has no
groups of 16, so Q6_K, Q3_K and Q2_K are re-quantized (or dequantized) by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

# Bytes per block and weights per block of each supported quantized type.
BLOCKS = {
    T.Q8_0: (34, 32),
    T.Q4_0: (18, 32),
    T.Q4_1: (20, 32),
    T.Q5_0: (22, 32),
    T.Q5_1: (24, 32),
    T.Q4_K: (144, 256),
    T.Q5_K: (176, 256),
    T.Q6_K: (210, 256),
    T.Q3_K: (110, 256),
    T.Q2_K: (84, 256),
}
GROUP16 = (T.Q6_K, T.Q3_K, T.Q2_K)


@dataclass
class Codes:
    """Affine codes of one tensor, [rows, cols] in weights: w = scales * q + biases per group."""

    q: np.ndarray  # uint8 [rows, cols]
    scales: np.ndarray  # float32 [rows, cols / group]
    biases: np.ndarray  # float32 [rows, cols / group]
    bits: int
    group: int


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes [rows, cols] as MLX's packed uint32 [rows, cols * bits / 32]: a little-endian bit stream."""
    rows = q.shape[0]
    if bits == 8:
        return np.ascontiguousarray(q).view(np.uint32)
    if bits == 4:
        return np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4)).view(np.uint32)
    # Eight codes make exactly `bits` bytes: build them in a uint64, one column at a time, keep the low bytes.
    eight = q.reshape(-1, 8)
    word = eight[:, 0].astype(np.uint64)
    for i in range(1, 8):
        word |= eight[:, i].astype(np.uint64) << np.uint64(bits * i)
    return np.ascontiguousarray(word.view(np.uint8).reshape(-1, 8)[:, :bits]).reshape(rows, -1).view(np.uint32)


def unpack(qtype: T, raw: np.ndarray, rows: int, cols: int) -> Codes:
    """The affine codes of `rows` x `cols` weights stored as ggml blocks of `qtype` in the bytes `raw`."""
    size, per = BLOCKS[qtype]
    blocks = np.ascontiguousarray(raw).reshape(-1, size)
    if blocks.shape[0] * per != rows * cols:
        raise ValueError(f"{blocks.shape[0]} blocks of {per} for {rows}x{cols} weights")
    q, scales, biases, bits, group = _UNPACK[qtype](blocks)
    return Codes(q.reshape(rows, cols), scales.reshape(rows, -1), biases.reshape(rows, -1), bits, group)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of every block, as float32 [n, 1]."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Legacy 32-blocks: low nibbles are weights 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit j of the little-endian uint32 is weight j's fifth bit, as 16 (set) or 0."""
    word = np.ascontiguousarray(qh).view("<u4")
    return (((word >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _q8_0(b):
    d = _f16(b, 0)
    q = (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return q, d, -128 * d, 8, 32


def _q4_0(b):
    d = _f16(b, 0)
    return _nibbles(b[:, 2:18]), d, -8 * d, 4, 32


def _q4_1(b):
    return _nibbles(b[:, 4:20]), _f16(b, 0), _f16(b, 2), 4, 32


def _q5_0(b):
    d = _f16(b, 0)
    return _nibbles(b[:, 6:22]) | _high_bits(b[:, 2:6]), d, -16 * d, 5, 32


def _q5_1(b):
    return _nibbles(b[:, 8:24]) | _high_bits(b[:, 4:8]), _f16(b, 0), _f16(b, 2), 5, 32


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins packed into 12 bytes, as uint8 [n, 8] each."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, mn


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: each 32 bytes hold two sub-blocks of 32, the low nibbles first."""
    n = qs.shape[0]
    chunks = qs.reshape(n, 4, 1, 32)
    return np.concatenate([chunks & 0xF, chunks >> 4], axis=2).reshape(n, 256)


def _k_affine(b: np.ndarray, q: np.ndarray, bits: int):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales_mins(b[:, 4:16])
    return q, d * sc.astype(np.float32), -(dmin * mn.astype(np.float32)), bits, 32


def _q4_k(b):
    return _k_affine(b, _k_nibbles(b[:, 16:144]), 4)


def _q5_k(b):
    n = b.shape[0]
    qh = b[:, 16:48]  # bit s of byte l is the fifth bit of weight l of sub-block s
    fifth = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4
    return _k_affine(b, _k_nibbles(b[:, 48:176]) | fifth.reshape(n, 256), 5)


def _q6_k(b):
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)  # [half, first/second 32 bytes, l]
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # [half, k=0..3, l]
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    q = (low | (high << 4)).reshape(n, 256)
    scale = _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)
    return q, scale, -32 * scale, 6, 16


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, s = b[:, 0:32], b[:, 32:96].reshape(n, 2, 1, 32), b[:, 96:108]
    low = (qs >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3  # [half, j, l]
    bit = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [4*half + j, l]
    # A set bit means the code as it is; a clear one means code - 4, so q + 4 is the unsigned code.
    q = low.reshape(n, 8, 32) + (bit << 2)
    i = np.arange(16)
    sc = ((s[:, i % 8] >> (4 * (i // 8))) & 0xF) | (((s[:, 8 + i % 4] >> (2 * (i // 4))) & 3) << 4)
    scale = _f16(b, 108) * (sc.astype(np.float32) - 32)
    return q.reshape(n, 256).astype(np.uint8), scale, -4 * scale, 3, 16


def _q2_k(b):
    n = b.shape[0]
    s, qs = b[:, 0:16], b[:, 16:80].reshape(n, 2, 1, 32)
    q = ((qs >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3).reshape(n, 256)
    d, dmin = _f16(b, 80), _f16(b, 82)
    return q, d * (s & 0xF).astype(np.float32), -(dmin * (s >> 4).astype(np.float32)), 2, 16


_UNPACK = {
    T.Q8_0: _q8_0,
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
    T.Q3_K: _q3_k,
    T.Q2_K: _q2_k,
}
