"""A quantized linear layer with a float low-rank side path: y = Q(W)·x + B·(A·x).

EoRA adapters (GPTQ + EoRA checkpoints) run through it; any recipe that corrects a quantized weight with a
low-rank term can use it too. It subclasses `nn.QuantizedLinear`, so code that finds quantized layers finds it.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn


class CastQuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` whose output takes the input's dtype.

    Its scales and biases may be wider than the activations (float32 keeps imported scales exact): without the
    cast, a bfloat16 model's activations, KV cache and every later matmul would be promoted to float32.
    """

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x).astype(x.dtype)

    def quant_params(self) -> dict[str, Any]:
        """This layer's entry in an MLX checkpoint's `quantization` block; `exact_scales` brings the cast back."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode, "exact_scales": True}

    @classmethod
    def empty(
        cls, input_dims: int, output_dims: int, params: dict[str, Any], bias: bool = False
    ) -> CastQuantizedLinear:
        """A zero layer of the shapes `params` (a `quant_params()` entry) describes, to load saved tensors into."""
        mode = params.get("mode", "affine")
        weight, scales, biases = _packed_zeros(input_dims, output_dims, params["group_size"], params["bits"], mode)
        layer = quantized_linear(weight, scales, biases, params["group_size"], params["bits"], mode)
        if bias:
            layer.bias = mx.zeros((output_dims,), mx.float32)
        return layer


class LowRankQuantizedLinear(CastQuantizedLinear):
    """`CastQuantizedLinear` plus `(x @ lora_a.T) @ lora_b.T`, with `lora_a` [rank, in] and `lora_b` [out, rank].

    The side path is unscaled: fold any alpha/rank factor into `lora_b` before building the layer. Keep
    `lora_a`/`lora_b` in the activations' dtype.
    """

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        rank: int,
        *,
        group_size: int,
        bits: int,
        mode: str = "affine",
        bias: bool = False,
        dtype: mx.Dtype = mx.bfloat16,
    ):
        # Not QuantizedLinear.__init__: it quantizes a random full-size weight that loading replaces anyway.
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, biases = _packed_zeros(input_dims, output_dims, group_size, bits, mode, dtype)
        if biases is not None:
            self.biases = biases
        if bias:
            self.bias = mx.zeros((output_dims,), dtype)
        self.lora_a = mx.zeros((rank, input_dims), dtype)
        self.lora_b = mx.zeros((output_dims, rank), dtype)
        self.freeze()

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def __call__(self, x: mx.array) -> mx.array:
        y = super().__call__(x)
        return y + (x @ self.lora_a.T) @ self.lora_b.T

    def _extra_repr(self) -> str:
        return f"{super()._extra_repr()}, rank={self.rank}"

    def quant_params(self) -> dict[str, Any]:
        """This layer's entry in an MLX checkpoint's `quantization` block."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode, "low_rank": self.rank}

    @classmethod
    def empty(
        cls, input_dims: int, output_dims: int, params: dict[str, Any], bias: bool = False
    ) -> LowRankQuantizedLinear:
        """A zero layer of the shapes `params` (a `quant_params()` entry) describes, to load saved tensors into."""
        return cls(
            input_dims,
            output_dims,
            params["low_rank"],
            group_size=params["group_size"],
            bits=params["bits"],
            mode=params.get("mode", "affine"),
            bias=bias,
        )

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear, lora_a: mx.array, lora_b: mx.array) -> LowRankQuantizedLinear:
        """`layer`'s quantized tensors (shared, not copied) with the side path `lora_a`, `lora_b` added."""
        rank, input_dims = lora_a.shape
        out = cls(
            input_dims,
            lora_b.shape[0],
            rank,
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
            bias="bias" in layer,
            dtype=lora_a.dtype,
        )
        out.update(layer.parameters())
        out.lora_a, out.lora_b = lora_a, lora_b
        out.freeze()
        return out


def quantized_linear(
    weight: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int, mode: str = "affine"
) -> CastQuantizedLinear:
    """A `CastQuantizedLinear` holding these packed tensors, built without quantizing a random weight first."""
    layer = CastQuantizedLinear(128, 1, bias=False, group_size=group_size, bits=bits, mode=mode)  # tiny, replaced
    layer.weight, layer.scales = weight, scales
    if biases is not None:
        layer.biases = biases
    layer.freeze()
    return layer


def _packed_zeros(
    input_dims: int, output_dims: int, group_size: int, bits: int, mode: str, dtype: mx.Dtype = mx.float32
) -> tuple[mx.array, mx.array, mx.array | None]:
    """Zero (weight, scales, biases) of a quantized layer's shapes; affine statistics in `dtype`, lazy until replaced.

    One packed row gives the shapes and dtypes of the mode's tensors, without quantizing a full random weight.
    """
    packed, *stats = mx.quantize(mx.zeros((1, input_dims)), group_size, bits, mode=mode)
    stat_dtype = dtype if mode == "affine" else stats[0].dtype
    weight = mx.zeros((output_dims, packed.shape[1]), packed.dtype)
    scales = mx.zeros((output_dims, stats[0].shape[1]), stat_dtype)
    biases = mx.zeros((output_dims, stats[1].shape[1]), stat_dtype) if len(stats) > 1 else None
    return weight, scales, biases
