"""What every quantization method shares: the target format, calibration statistics, the result type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class Target:
    """The packed format of one layer: MLX's `mx.quantize(w, group_size, bits, mode)`."""

    bits: int
    group_size: int
    mode: str = "affine"


@dataclass
class QuantizedWeight:
    """`mx.quantize`'s output for one weight: packed values, per-group scales and (affine) biases."""

    weight: mx.array
    scales: mx.array
    biases: mx.array | None


class LinearStats:
    """Running statistics of a linear layer's inputs x (shape (..., in_features)) over calibration text.

    `hessian` is sum(x^T x) (for error-feedback methods such as GPTQ), `abs_mean` the mean |x| per input
    channel (for activation-aware scaling), and `sample` keeps up to `max_rows` input rows (for searches
    that need real activations, e.g. clipping).
    """

    def __init__(self, in_features: int, max_rows: int = 2048, want_hessian: bool = True):
        self.rows = 0
        self.hessian = mx.zeros((in_features, in_features), dtype=mx.float32) if want_hessian else None
        self.abs_sum = mx.zeros((in_features,), dtype=mx.float32)
        self.max_rows = max_rows
        self._samples: list[mx.array] = []
        self._sampled = 0

    def update(self, x: mx.array) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        self.rows += x.shape[0]
        if self.hessian is not None:
            self.hessian = self.hessian + x.T @ x
        self.abs_sum = self.abs_sum + mx.abs(x).sum(axis=0)
        if self._sampled < self.max_rows:
            keep = x[: self.max_rows - self._sampled]
            self._samples.append(keep)
            self._sampled += keep.shape[0]
        mx.eval(self.hessian, self.abs_sum, *self._samples[-1:])

    def rescale(self, factor: mx.array) -> None:
        """The statistics of inputs x * factor (per input channel), e.g. after a scale is folded into the norm."""
        if self.hessian is not None:
            self.hessian = self.hessian * factor[:, None] * factor[None, :]
        self.abs_sum = self.abs_sum * factor
        self._samples = [x * factor for x in self._samples]
        mx.eval(self.hessian, self.abs_sum, *self._samples)

    @property
    def abs_mean(self) -> mx.array:
        return self.abs_sum / max(self.rows, 1)

    @property
    def sample(self) -> mx.array:
        return mx.concatenate(self._samples) if self._samples else mx.zeros((0, self.abs_sum.shape[0]))


Method = Callable[[mx.array, Target, "LinearStats | None"], QuantizedWeight]


def rtn(weight: mx.array, target: Target, stats: LinearStats | None = None) -> QuantizedWeight:
    """Round to nearest: MLX's own group quantization, no calibration."""
    packed = mx.quantize(weight, group_size=target.group_size, bits=target.bits, mode=target.mode)
    weight_q, scales, *rest = packed
    return QuantizedWeight(weight_q, scales, rest[0] if rest else None)


# Recipe method name -> function. Calibrated methods register themselves in their own modules.
METHODS: dict[str, Method] = {"rtn": rtn}
