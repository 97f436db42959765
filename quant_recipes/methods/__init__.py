"""Quantization methods: each turns one full-precision weight into MLX's packed (weight, scales, biases).

A method is a function `quantize(weight, target, stats) -> QuantizedWeight`; `stats` holds what the
layer saw during calibration (None for methods that need none). `METHODS` maps recipe names to them.
"""

from .base import METHODS, LinearStats, QuantizedWeight, Target

__all__ = ["METHODS", "LinearStats", "QuantizedWeight", "Target"]
