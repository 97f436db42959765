"""One GGUF tensor at a time into MLX arrays: float as it is, ggml blocks into affine codes, with bookkeeping.

Groups of 16 (Q6_K, Q3_K, Q2_K) have no exact MLX layout; `APERTUS_GGUF_GROUP16` chooses:

- `requant` (default): re-quantize to MLX affine g32 with fp16 scales: 8-bit for Q6_K, 5-bit for Q3_K, 4-bit
  for Q2_K, the narrowest widths that add under 0.3x the type's own rounding error (on random valid blocks:
  0.29x, 0.29x, 0.25x; fp32 scales would gain nothing). Each load measures and notes the error it added;
- `float16`: dequantize to float16 (2.4x Q6_K's memory; rounding to fp16 is the only change).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from ..errors import CheckpointError, ConfigError
from .gguf_quants import BLOCKS, GROUP16, pack, unpack

FLOATS = {T.F32: mx.float32, T.F16: mx.float16, T.BF16: mx.bfloat16}
REQUANT_BITS = {T.Q6_K: 8, T.Q3_K: 5, T.Q2_K: 4}
BITS = {T.Q8_0: 8, T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q4_K: 4, T.Q5_K: 5}
CHUNK = 1 << 24  # weights converted at a time
SAMPLE = 8  # one row in SAMPLE measures re-quantization error
# Legacy types' scales are fp16 values, kept so; K-quant scales are fp16 x 6-bit products, exact only in fp32.
EXACT_SCALES = {T.Q8_0: mx.float16, T.Q4_0: mx.float16, T.Q4_1: mx.float16, T.Q5_0: mx.float16}
EXACT_SCALES |= {T.Q5_1: mx.float16, T.Q4_K: mx.float32, T.Q5_K: mx.float32}


def metadata(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value (scalar, string or list), or `default` when the key is absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def group16_mode() -> str:
    mode = os.environ.get("APERTUS_GGUF_GROUP16", "requant")
    if mode not in ("requant", "float16"):
        raise ConfigError(f"APERTUS_GGUF_GROUP16={mode!r}: expected 'requant' or 'float16'")
    return mode


class Converter:
    """Turns GGUF tensors into our parameters, counting weights per storage and measuring re-quantization."""

    def __init__(self, where: str):
        self.where = where
        self.mode = group16_mode()
        self.modules: Counter = Counter()
        self._error: dict[str, list[float]] = {}  # per source type: [sum sq error, sum sq weight, own error sq]

    def __call__(self, tensor: Any) -> tuple[dict[str, mx.array], dict[str, Any] | None]:
        """({"weight": ...} or {"weight", "scales", "biases"}, quantization settings or None) for one tensor."""
        try:
            qtype = T(int(tensor.tensor_type))
        except ValueError:
            qtype = None
        name, shape = tensor.name, [int(n) for n in reversed(tensor.shape)]
        if qtype in FLOATS:
            self.modules[f"{qtype.name} float"] += tensor.n_elements
            return {"weight": _float(tensor.data, qtype, shape)}, None
        if qtype not in BLOCKS:
            kind = qtype.name if qtype is not None else f"type {int(tensor.tensor_type)}"
            raise CheckpointError(f"{self.where}: tensor {name} has ggml type {kind}, which is not supported")
        if len(shape) != 2:
            raise CheckpointError(f"{self.where}: tensor {name} is quantized {qtype.name} but not 2-D")
        rows, cols = shape
        step = max(1, CHUNK // cols)  # rows at a time, so a large embedding's scratch stays bounded
        parts = [self._rows(qtype, name, tensor.data[r : r + step], cols) for r in range(0, rows, step)]
        arrays = {k: mx.concatenate([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
        if "scales" not in arrays:
            self.modules[f"{qtype.name} -> float16 (dequantized)"] += tensor.n_elements
            return arrays, None
        bits = REQUANT_BITS.get(qtype) or BITS[qtype]
        requant = " (re-quantized)" if qtype in GROUP16 else ""
        self.modules[f"{qtype.name} -> affine {bits}-bit g32{requant}"] += tensor.n_elements
        return arrays, {"group_size": 32, "bits": bits, "mode": "affine"}

    def _rows(self, qtype: T, name: str, raw: np.ndarray, cols: int) -> dict[str, mx.array]:
        """The MLX arrays of some whole rows of a quantized tensor."""
        try:
            codes = unpack(qtype, raw, raw.shape[0], cols)
        except ValueError as e:
            raise CheckpointError(f"{self.where}: tensor {name}: bad {qtype.name} data ({e})") from None
        if qtype not in GROUP16:
            dtype = EXACT_SCALES[qtype]
            return {
                "weight": mx.array(pack(codes.q, codes.bits)),
                "scales": mx.array(codes.scales).astype(dtype),
                "biases": mx.array(codes.biases).astype(dtype),
            }
        rows = raw.shape[0]
        groups = mx.array(codes.q).reshape(rows, -1, codes.group)
        # uint8 codes times float32 scales: the same float32 products as ggml's own dequantization.
        exact = (groups * mx.array(codes.scales)[..., None] + mx.array(codes.biases)[..., None]).reshape(rows, cols)
        if self.mode == "float16":
            return {"weight": exact.astype(mx.float16)}
        bits = REQUANT_BITS[qtype]
        w, scales, biases = mx.quantize(exact, group_size=32, bits=bits)
        scales, biases = scales.astype(mx.float16), biases.astype(mx.float16)
        # The error is measured on every SAMPLE-th row (dequantizing is the slow part on CPU), in float32 from
        # the fp16 scales as stored.
        sample = slice(None, None, SAMPLE)
        wide = (scales[sample].astype(mx.float32), biases[sample].astype(mx.float32))
        back = mx.dequantize(w[sample], *wide, group_size=32, bits=bits)
        sq_err, sq_w = mx.sum(mx.square(back - exact[sample])), mx.sum(mx.square(exact[sample]))
        mx.eval(w, scales, biases, sq_err, sq_w)
        err = self._error.setdefault(qtype.name, [0.0, 0.0, 0.0])
        err[0] += sq_err.item()
        err[1] += sq_w.item()
        # The type's own rounding error, estimated as uniform rounding at each group's step: step^2 / 12.
        err[2] += float(np.sum(np.square(codes.scales[sample]), dtype=np.float64) * codes.group / 12)
        return {"weight": w, "scales": scales, "biases": biases}

    def notes(self) -> list[str]:
        """One line per re-quantized type: its measured error against exact dequantization."""
        out = []
        for name, (sq_err, sq_w, own) in sorted(self._error.items()):
            rel = (sq_err / max(sq_w, 1e-30)) ** 0.5
            ratio = (sq_err / max(own, 1e-30)) ** 0.5
            out.append(
                f"{name} re-quantized to affine {REQUANT_BITS[T[name]]}-bit g32 (no group-16 layout in MLX): "
                f"relative RMS error {rel:.2e} vs exact dequantization, {ratio:.2f}x {name}'s own rounding; "
                "APERTUS_GGUF_GROUP16=float16 dequantizes instead"
            )
        return out


def _float(data: np.ndarray, qtype: T, shape: list[int]) -> mx.array:
    if qtype == T.BF16:  # the reader gives raw bytes; bf16 has no numpy dtype
        return mx.array(np.ascontiguousarray(data).view(np.uint16).reshape(shape)).view(mx.bfloat16)
    return mx.array(np.asarray(data).reshape(shape))
