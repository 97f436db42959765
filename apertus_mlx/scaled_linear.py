"""A quantized linear layer with one extra float32 scale per tensor: NVFP4 as NVIDIA's tools publish it.

NVFP4 stores E2M1 weights with an E4M3 scale per group of 16, and a float32 scale for the whole tensor that
widens the E4M3 range. MLX's `nvfp4` mode is exactly the first two; the tensor scale is applied here, to the
matmul's output, which equals scaling every weight (a scalar commutes with the sum).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

PARAMS = {"group_size": 16, "bits": 4, "mode": "nvfp4", "tensor_scale": True}


class ScaledQuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` in `nvfp4` mode whose output is multiplied by `tensor_scale` (a float32 scalar).

    Parameters: `weight` (uint32, eight E2M1 codes each, first in the low bits), `scales` (uint8 E4M3 bit
    patterns, one per 16 inputs), `tensor_scale`, and `bias` if any.
    """

    def __init__(self, input_dims: int, output_dims: int, bias: bool = False):
        super().__init__(input_dims, output_dims, bias=bias, group_size=16, bits=4, mode="nvfp4")
        self.tensor_scale = mx.array(1.0, dtype=mx.float32)
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        dtype = x.dtype
        if dtype == mx.float16:
            # Unscaled sums reach |x| * 6 * 448 per weight: float16 overflows before the tensor scale shrinks them.
            x = x.astype(mx.float32)
        y = mx.quantized_matmul(
            x, self["weight"], scales=self["scales"], transpose=True, group_size=16, bits=4, mode="nvfp4"
        )
        y = (y * self["tensor_scale"]).astype(dtype)  # the float32 scalar would otherwise promote y
        if "bias" in self:
            y = y + self["bias"]
        return y

    def quant_params(self) -> dict[str, Any]:
        """This layer's entry in a checkpoint's `quantization` block."""
        return dict(PARAMS)

    @classmethod
    def empty(cls, input_dims: int, output_dims: int, params: dict[str, Any], bias: bool = False):
        """A zero layer of the right shapes, to load saved tensors into; `params` as `quant_params` gives."""
        if {k: params.get(k) for k in PARAMS} != PARAMS:
            raise ValueError(f"not a tensor-scaled NVFP4 layer: {params}")
        layer = cls(input_dims, output_dims, bias=bias)
        layer.weight = mx.zeros(layer.weight.shape, dtype=mx.uint32)
        layer.scales = mx.zeros(layer.scales.shape, dtype=mx.uint8)
        return layer
