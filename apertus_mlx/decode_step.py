"""The decode step (one new token per sequence) as one compiled call per layer instead of some twenty operations.

At the sizes people run on a Mac, a decode step is bound by per-operation overhead, not by bytes: building
the graph in Python can cost as much as the device's work. Everything between two reads of the KV cache is
therefore one `mx.compile`d call: the embedding and layer 0's projections, then for each layer its output
projection, MLP and the next layer's projections, and last the final norm and the head. What stays in
Python per layer is the cache update and attention, whose shapes grow with every token.

The compiled calls run the very same modules as the plain forward (`DecoderLayer.attention_inputs` and
`finish`), op for op, so they give the same logits. The modules are the compiled functions' implicit
inputs, read at every call, so weights changed or layers swapped later are used, never stale copies.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask


class DecodeStep:
    """`step(inputs, cache)`: logits (B, 1, vocab) of `model` for one token per sequence (B, 1), as `model` would."""

    def __init__(self, model: Any):
        decoder, layers = model.decoder, model.layers
        self._layers = layers

        def first(inputs: mx.array, offset: mx.array) -> tuple[mx.array, ...]:
            h = decoder.embed(inputs)
            return (h, *layers[0].attention_inputs(h, offset))

        def between(i: int, h: mx.array, attended: mx.array, offset: mx.array) -> tuple[mx.array, ...]:
            h = layers[i].finish(h, attended)
            return (h, *layers[i + 1].attention_inputs(h, offset))

        def last(h: mx.array, attended: mx.array) -> mx.array:
            return model.head(decoder.norm(layers[-1].finish(h, attended)))

        self._first = mx.compile(first, inputs=[decoder.embed_tokens, decoder.norm, layers[0]])
        self._between = [
            mx.compile(partial(between, i), inputs=[layers[i], layers[i + 1]]) for i in range(len(layers) - 1)
        ]
        head = decoder.embed_tokens if model.args.tie_word_embeddings else model.lm_head
        self._last = mx.compile(last, inputs=[head, decoder.norm, layers[-1]])

    def __call__(self, inputs: mx.array, cache: list[Any]) -> mx.array:
        offset = cache[0].offset  # an int, or (B,) for a batch; an array either way, so no call retraces
        offset = offset if isinstance(offset, mx.array) else mx.array(offset)
        h, q, k, v = self._first(inputs, offset)
        mask = create_attention_mask(h, cache[0])
        for i, (layer, layer_cache) in enumerate(zip(self._layers, cache, strict=True)):
            attended = layer.self_attn.attend(q, k, v, mask, layer_cache)
            if i < len(self._between):
                h, q, k, v = self._between[i](h, attended, offset)
        return self._last(h, attended)
