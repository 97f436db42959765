"""The Apertus architecture in MLX.

Apertus is a pre-norm decoder-only transformer: grouped-query attention with an RMSNorm on every
query and key head (QK-norm) before llama3-scaled RoPE, and a non-gated MLP whose activation is
xIELU with learned per-layer parameters. Module attribute names equal the Hugging Face tensor
names, so a checkpoint loads by name after `Model.sanitize`.

Apertus 1.5 checkpoints (text path) run on the same decoder; `apertus1p5.py` maps their configs and
tensor names onto it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, RotatingKVCache

from . import apertus1p5
from .decode_step import DecodeStep
from .errors import ConfigError

# Keys without which the model's shape is unknown; the rest have the reference's defaults.
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass
class ModelArgs:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # rows of the LM head: the width of the logits, so the ids that can be generated
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 65536
    tie_word_embeddings: bool = False
    rope_theta: float = 12_000_000.0
    rope_scaling: dict[str, Any] | None = None  # None: plain RoPE; else llama3 parameters
    qk_norm: bool = True
    mlp_bias: bool = False
    attention_bias: bool = False
    model_type: str = "apertus"  # or "apertus1p5_text", "apertus1p5"
    input_vocab_size: int | None = None  # rows of the input embedding when more than `vocab_size` (Apertus 1.5)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.input_vocab_size is None:
            self.input_vocab_size = self.vocab_size

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from a `config.json` dict: Apertus (transformers 4.56+ or >= 5 schema) or Apertus 1.5's text path."""
        model_type = config.get("model_type")
        if model_type == "apertus":
            text, where = config, ""
        elif model_type in apertus1p5.MODEL_TYPES:
            text, where = apertus1p5.text_settings(config)
        else:
            expected = ", ".join(repr(t) for t in ("apertus", *apertus1p5.MODEL_TYPES))
            raise ConfigError(f"config.json: model_type is {model_type!r}, expected one of {expected}")
        if missing := [k for k in _REQUIRED if k not in text]:
            raise ConfigError(f"config.json: missing key(s) {', '.join(where + k for k in missing)}")
        if (act := text.get("hidden_act", "xielu")) != "xielu":
            raise ConfigError(f"config.json: {where}hidden_act {act!r} is not supported (Apertus uses 'xielu')")
        if text.get("post_norm", False):
            raise ConfigError(f"config.json: {where}post_norm=true is not supported (no Apertus release uses it)")

        heads = text["num_attention_heads"]
        kv_heads = text.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ConfigError(
                f"config.json: {where}num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        theta, scaling = _rope_from_config(text, where)
        vocab = text["vocab_size"]
        head = apertus1p5.head_rows(text, where) if model_type in apertus1p5.MODEL_TYPES else vocab
        return cls(
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            vocab_size=head,
            input_vocab_size=vocab,
            rms_norm_eps=text.get("rms_norm_eps", 1e-5),
            max_position_embeddings=text.get("max_position_embeddings", 65536),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            rope_theta=theta,
            rope_scaling=scaling,
            qk_norm=bool(text.get("qk_norm", True)),
            mlp_bias=bool(text.get("mlp_bias", False)),
            attention_bias=bool(text.get("attention_bias", False)),
            model_type=model_type,
            extra=config,
        )


def _rope_from_config(config: dict[str, Any], prefix: str = "") -> tuple[float, dict[str, Any] | None]:
    """(theta, llama3 scaling or None) from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling`."""
    if isinstance(config.get("rope_parameters"), dict):
        params = config["rope_parameters"]
        where = prefix + "rope_parameters"
    else:
        params = dict(config.get("rope_scaling") or {})
        if "rope_theta" in config:
            params.setdefault("rope_theta", config["rope_theta"])
        where = prefix + "rope_scaling"
    if "rope_theta" not in params:
        raise ConfigError(f"config.json: missing key {prefix}rope_theta (or {prefix}rope_parameters.rope_theta)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(params["rope_theta"]), None
    if rope_type != "llama3":
        raise ConfigError(
            f"config.json: {where}.rope_type {rope_type!r} is not supported (expected 'llama3' or 'default')"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if missing := [k for k in keys if k not in params]:
        raise ConfigError(f"config.json: {where} lacks {', '.join(missing)} for llama3 RoPE")
    return float(params["rope_theta"]), {"rope_type": "llama3", **{k: params[k] for k in keys}}


def rope_periods(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> mx.array:
    """Per-pair rotation periods (1 / inverse frequency) with llama3 long-context scaling.

    Frequencies whose wavelength exceeds the original context are slowed by `factor`, short ones
    are kept, and those in between are interpolated smoothly.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if scaling is not None:
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= context / high) & (wavelen <= context / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return mx.array(1.0 / inv_freq, dtype=mx.float32)


# Shapeless: one compiled kernel for every prompt length. `square(x)` rather than `x * x` keeps
# bf16 rounding identical to mlx-lm's port, so both give the same logits on the same weights.
@partial(mx.compile, shapeless=True)
def xielu(x: mx.array, alpha_p: mx.array, alpha_n: mx.array, beta: mx.array, eps: mx.array) -> mx.array:
    alpha_p = nn.softplus(alpha_p)
    alpha_n = beta + nn.softplus(alpha_n)
    positive = alpha_p * mx.square(x) + beta * x
    negative = (mx.expm1(mx.minimum(x, eps)) - x) * alpha_n + beta * x
    return mx.where(x > 0, positive, negative)


class XIELU(nn.Module):
    """xIELU activation; `alpha_p`, `alpha_n` are learned pre-softplus scalars, `beta`, `eps` fixed."""

    def __init__(self):
        super().__init__()
        # Placeholders with the reference's initial values; checkpoints overwrite all four.
        self.alpha_p = mx.array(math.log(math.expm1(0.8)))
        self.alpha_n = mx.array(math.log(math.expm1(0.8 - 0.5)))
        self.beta = mx.array(0.5)
        self.eps = mx.array(-1e-6)

    def __call__(self, x: mx.array) -> mx.array:
        return xielu(x, self.alpha_p, self.alpha_n, self.beta, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.scale = args.head_dim**-0.5
        dim, bias = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self._periods = rope_periods(args.head_dim, args.rope_theta, args.rope_scaling)

    def project(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys and values (B, heads, L, D) of normed `x`, the first at position `offset`."""
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)  # (B, L, H, D)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)  # (B, L, Hkv, D)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, heads, L, D)
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._periods)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._periods)
        return q, k, v

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Any, cache: Any | None) -> mx.array:
        """Store the new keys and values in `cache`, attend over all of them: (B, L, H * D), before `o_proj`."""
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        B, _, L, _ = q.shape
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)
        self.act_fn = XIELU()

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act_fn(self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.feedforward_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    # A layer is split where attention reads the cache, so the decode step (`decode_step.py`) can compile the rest.
    def attention_inputs(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array, mx.array]:
        return self.self_attn.project(self.attention_layernorm(x), offset)

    def finish(self, x: mx.array, attended: mx.array) -> mx.array:
        h = x + self.self_attn.o_proj(attended)
        return h + self.mlp(self.feedforward_layernorm(h))

    def __call__(self, x: mx.array, mask: Any, cache: Any | None) -> mx.array:
        q, k, v = self.attention_inputs(x, cache.offset if cache is not None else 0)
        return self.finish(x, self.self_attn.attend(q, k, v, mask, cache))


class ApertusModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.input_vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def embed(self, inputs: mx.array) -> mx.array:
        h = self.embed_tokens(inputs)  # (B, L, hidden)
        if h.dtype != self.norm.weight.dtype:  # a quantized embedding's wider scales (GGUF) must not lift the model
            h = h.astype(self.norm.weight.dtype)
        return h

    def __call__(self, inputs: mx.array, cache: list[Any] | None) -> mx.array:
        h = self.embed(inputs)
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            h = layer(h, mask, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    """Apertus causal LM: `model(ids, cache)` maps (B, L) token ids to (B, L, vocab) logits.

    `vocab` is `args.vocab_size`, the head's rows; ids fed in may be any below `args.input_vocab_size`.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        decoder = ApertusModel(args)
        self.model = apertus1p5.MultimodalModel(decoder) if args.model_type == apertus1p5.FULL else decoder
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

        self.compiled_decode = True  # one token per sequence goes through `DecodeStep`; False: the plain forward
        self._step: DecodeStep | None = None  # built at the first decode step

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        if self.compiled_decode and cache is not None and inputs.shape[1] == 1:
            if self._step is None:
                self._step = DecodeStep(self)
            return self._step(inputs, cache)
        return self.head(self.model(inputs, cache))

    def head(self, h: mx.array) -> mx.array:
        """Logits of the decoder's normed output."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def decoder(self) -> ApertusModel:
        return self.model.language_model if self.args.model_type == apertus1p5.FULL else self.model

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    @property
    def decoder_prefix(self) -> str:
        """Where the decoder's tensors are named: `model` (Apertus, 1.5 text) or `model.language_model`."""
        return "model.language_model" if self.args.model_type == apertus1p5.FULL else "model"

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Every checkpoint fix-up in one place: maps a checkpoint's tensors onto our parameters."""
        out = {}
        skip = apertus1p5.MEDIA_PREFIXES if self.args.model_type in apertus1p5.MODEL_TYPES else ()
        for name, w in weights.items():
            if name.endswith(("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")):
                continue  # buffers some exporters write; recomputed from the config
            if skip and name.startswith(skip):
                continue  # Apertus 1.5's image and audio tokenizers: not part of the text path, left unread
            if ".act_fn." in name:
                w = w.reshape(())  # the reference stores alpha_p/alpha_n as shape (1,), beta/eps as ()
            out[name] = w
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        # Checkpoints that drop the xIELU constants get the reference's defaults, as it does.
        for i, layer in enumerate(self.layers):
            for const in ("beta", "eps"):
                out.setdefault(f"{self.decoder_prefix}.layers.{i}.mlp.act_fn.{const}", getattr(layer.mlp.act_fn, const))
        return out

    def make_cache(self, max_kv_size: int | None = None) -> list[Any]:
        """A fresh per-layer KV cache; with `max_kv_size`, a rotating one that keeps the first 4 tokens."""
        if max_kv_size is not None:
            return [RotatingKVCache(max_size=max_kv_size, keep=4) for _ in self.layers]
        return [KVCache() for _ in self.layers]
