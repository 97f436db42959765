"""Apertus 1.5's images as tokens: preprocessing, the vision tokenizer (MLX), placeholder expansion.

Apertus 1.5 reads an image as ordinary vocabulary ids. The path, as transformers' `apertus1p5` runs it:

1. Preprocessing (`pixel_values`): RGB (transparency composited onto white), resized with antialiased
   bicubic filtering so both sides are multiples of 16 and the area lies within `min_pixels..max_pixels`,
   then scaled to [-1, 1]. The settings come from the checkpoint's `processor_config.json` (its
   `image_processor` object), else `preprocessor_config.json`, else the reference's defaults. The resize is
   the reference's own arithmetic: torchvision resizes uint8 images with PyTorch's integer kernel
   (int16 weights, a horizontal then a vertical pass, each rounded to uint8), which `_resize_bicubic`
   reproduces in NumPy; Pillow's bicubic differs from it by a level or two on about 1% of the pixels.
2. The vision tokenizer (`VisionTokenizer`), EMU3.5's encoder: 3x3 convolutions, GroupNorm (32 groups) and
   swish in residual blocks, single-head attention where the config asks, a stride-2 downsampling after each
   stage but the last (zero padding right and bottom only), then a 1x1 `quant_conv`. Each grid cell takes the
   codebook entry with the largest dot product (not the nearest). It always runs in float32, as the reference
   does: codes are an argmax, and bfloat16 rounding changes a good share of them (about 10% reported).
3. Codes read row by row, plus `image_token_offset`, are vocabulary ids that the text embedding table embeds.
   A `<|image|>` placeholder in the prompt becomes
   `<|img_start|>{rows}*{cols}<|img_token_start|>` + rows of codes joined by `<|img_end_of_row|>` (none after
   the last row) + `<|img_end|>`, the size being plain text. The marker strings are the tokenizer's
   (`image_token`, `boi_token`, `image_wrapper_token`, `eol_token`, `eoi_token`), their ids its ids.

`ImageTokenizer` ties these to one checkpoint: its weights (`model.vision_tokenizer.*`, which the text loader
leaves on disk) are read only when the first image is encoded, memory-mapped, as float32; token ids of
images already seen come from a small cache keyed by the image's content. Audio is not supported.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import ApertusError, CheckpointError, ConfigError

PREFIX = "model.vision_tokenizer."
# The reference processor's markers, used where a tokenizer does not name its own (as transformers' does).
DEFAULT_MARKERS = {
    "image_token": "<|image|>",
    "boi_token": "<|img_start|>",
    "image_wrapper_token": "<|img_token_start|>",
    "eol_token": "<|img_end_of_row|>",
    "eoi_token": "<|img_end|>",
}
DEFAULT_AUDIO_TOKEN = "<|audio|>"
# Apertus1p5VisionTokenizerConfig's defaults (the released tokenizer's shape).
DEFAULT_VISION_CONFIG: dict[str, Any] = {
    "codebook_size": 131072,
    "embed_dim": 256,
    "latent_channels": 256,
    "in_channels": 3,
    "base_channels": 256,
    "channel_multiplier": [1, 1, 2, 2, 4],
    "num_res_blocks": 4,
    "attn_resolutions": [16],
    "resolution": 256,
}
_BICUBIC = 3  # PILImageResampling.BICUBIC, the only filter the reference processor is configured with
_CACHE_SIZE = 32
_ARGMAX_CHUNK = 1 << 25  # codebook scores computed per block of grid cells: at most this many floats at once
# A 3x3 convolution's scratch is about 9 copies of its input; over this many input floats it runs in bands of rows.
_CONV_BAND = 1 << 21


class ImageError(ApertusError, ValueError):
    """An image input that cannot be used: not an image, unreadable, or of an unsupported shape."""


# ---- preprocessing ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSettings:
    """The image processor's settings that change pixel values (transformers' `Apertus1p5ImageProcessor`)."""

    min_pixels: int = 128 * 128
    max_pixels: int = 1400 * 1400
    spatial_factor: int = 16
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ImageSettings:
        """Read them where the reference does: `processor_config.json`'s `image_processor`, else
        `preprocessor_config.json`; the defaults when neither file is there."""
        path = Path(path)
        for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
            file = path / name
            if not file.is_file():
                continue
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{file}: not valid JSON ({_first_line(e)})") from None
            if key is not None:
                if not isinstance(data, dict) or key not in data:
                    continue
                data = data[key]
            if not isinstance(data, dict):
                raise ConfigError(f"{file}: expected a JSON object{f' under {key!r}' if key else ''}")
            return cls.from_dict(data, f"{name}: {key}." if key else f"{name}: ")
        return cls()

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> ImageSettings:
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if data.get(flag, True) is not True:
                raise ConfigError(f"{where}{flag}={data[flag]!r} is not supported (the reference sets it true)")
        if data.get("resample", _BICUBIC) != _BICUBIC:
            raise ConfigError(f"{where}resample {data['resample']!r} is not supported (3, bicubic, is)")
        size = data.get("size") or {"min_pixels": cls.min_pixels, "max_pixels": cls.max_pixels}
        if not isinstance(size, dict) or not {"min_pixels", "max_pixels"} <= size.keys():
            raise ConfigError(f"{where}size must hold min_pixels and max_pixels, got {size!r}")
        out = cls(
            min_pixels=int(size["min_pixels"]),
            max_pixels=int(size["max_pixels"]),
            spatial_factor=int(data.get("spatial_factor", cls.spatial_factor)),
            rescale_factor=float(data.get("rescale_factor", cls.rescale_factor)),
            image_mean=_triple(data.get("image_mean", cls.image_mean), where + "image_mean"),
            image_std=_triple(data.get("image_std", cls.image_std), where + "image_std"),
        )
        if not 0 < out.min_pixels <= out.max_pixels or out.spatial_factor < 1:
            raise ConfigError(f"{where}size {size!r} / spatial_factor {out.spatial_factor} do not make sense")
        return out


def _triple(value: Any, where: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise ConfigError(f"{where} must have 3 values (R, G, B), got {value!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


def target_size(height: int, width: int, settings: ImageSettings) -> tuple[int, int]:
    """(height, width) after resizing: multiples of `spatial_factor`, the area in `min_pixels..max_pixels`,
    the aspect ratio kept as well as that allows (the reference's `smart_resize`, its rounding included)."""
    factor = settings.spatial_factor
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f}:1 is too extreme (at most 200:1)")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > settings.max_pixels:
        beta = math.sqrt(height * width / settings.max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < settings.min_pixels:
        beta = math.sqrt(settings.min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def open_image(source: Any) -> Any:
    """A PIL image from a path, encoded bytes (PNG, JPEG, ...) or a PIL image; errors are one line naming it.

    Files and bytes are turned upright by their EXIF orientation, as transformers' `load_image` does.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, data = f"({len(source)} bytes)", bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        name = str(source)
        file = Path(source).expanduser()
        if not file.is_file():
            raise ImageError(f"image {name}: no such file")
        try:
            data = file.read_bytes()
        except OSError as e:
            raise ImageError(f"image {name}: cannot read it ({_first_line(e)})") from None
    else:
        raise ImageError(f"image of type {type(source).__name__} is not supported; pass a path, bytes or a PIL image")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise ImageError(f"image {name}: not an image file (unknown format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"image {name}: corrupt or unreadable image ({_first_line(e)})") from None


def rgb_array(image: Any) -> np.ndarray:
    """(H, W, 3) uint8 RGB; transparency is composited onto white, as the reference does."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (PIL's and PyTorch's antialiased bicubic)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _resize_axis(pixels: np.ndarray, size: int, axis: int) -> np.ndarray:
    """One pass of PyTorch's uint8 antialiased bicubic resize along `axis` (its integer kernel, exactly)."""
    n = pixels.shape[axis]
    if n == size:
        return pixels
    scale = n / size
    support = 2.0 * scale if scale >= 1 else 2.0
    taps = math.ceil(support) * 2 + 1
    inv = 1 / scale if scale >= 1 else 1.0
    center = scale * (np.arange(size) + 0.5)
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C++ casts truncate toward zero
    count = np.clip(np.minimum((center + support + 0.5).astype(np.int64), n) - lo, 0, taps)
    k = np.arange(taps)
    weights = np.where(k < count[:, None], _cubic((k + lo[:, None] - center[:, None] + 0.5) * inv), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total != 0)
    top = weights.max()
    bits = 0
    while bits < 22 and int(0.5 + top * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    scaled = weights * (1 << bits)
    iweights = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    moved = np.moveaxis(pixels, axis, 0).astype(np.int32)  # sums stay below 2**25
    acc = np.full((size, *moved.shape[1:]), 1 << (bits - 1), dtype=np.int32)
    extra = (1,) * (moved.ndim - 1)
    for j in range(taps):
        index = np.minimum(lo + j, n - 1)  # taps past `count` have weight 0
        acc += moved[index] * iweights[:, j].reshape(size, *extra)
    out = np.clip(acc >> bits, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def _resize_bicubic(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 resized to (height, width): the horizontal pass first, then the vertical one."""
    return _resize_axis(_resize_axis(pixels, width, axis=1), height, axis=0)


def pixel_values(image: Any, settings: ImageSettings | None = None) -> np.ndarray:
    """The vision tokenizer's input for one image: (H, W, 3) float32 in [-1, 1], H and W multiples of 16
    (`spatial_factor`); the reference processor's `pixel_values`, channels last and unpadded."""
    settings = settings or ImageSettings()
    pixels = rgb_array(open_image(image))
    height, width = pixels.shape[:2]
    if height == 0 or width == 0:
        raise ImageError("image has no pixels")
    pixels = _resize_bicubic(pixels, *target_size(height, width, settings))
    # Rescaling folded into the normalization, in float32, as the reference does: (x - 127.5) / 127.5 by default.
    mean = np.asarray(settings.image_mean, np.float32) * np.float32(1.0 / settings.rescale_factor)
    std = np.asarray(settings.image_std, np.float32) * np.float32(1.0 / settings.rescale_factor)
    return (pixels.astype(np.float32) - mean) / std


# ---- the vision tokenizer ---------------------------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True, pytorch_compatible=True)


def _swish(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)


def _conv3x3(conv: nn.Conv2d, x: mx.array, pad: tuple[int, int] = (1, 1), stride: int = 1) -> mx.array:
    """`conv` (3x3, no padding of its own) over `x` padded by `pad` rows/columns (before, after), in bands of rows.

    At full resolution the convolution's scratch memory is several gigabytes for one photo; computed a band of
    output rows at a time (each band reading its rows plus the kernel's overlap), it stays near one band's.
    """
    x = mx.pad(x, [(0, 0), pad, pad, (0, 0)])
    out_rows = (x.shape[1] - 3) // stride + 1
    band = max(1, _CONV_BAND // (x.shape[2] * x.shape[3] * stride))
    if band >= out_rows:
        return conv(x)
    parts = []
    for r in range(0, out_rows, band):
        parts.append(conv(x[:, r * stride : (min(r + band, out_rows) - 1) * stride + 3]))
        # Evaluated band by band: a backend keeps an operation's scratch until its whole batch of work completes.
        mx.eval(parts[-1])
    return mx.concatenate(parts, axis=1)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3)  # padded by _conv3x3
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = _conv3x3(self.conv1, _swish(self.norm1(x)))
        h = _conv3x3(self.conv2, _swish(self.norm2(h)))
        return (self.nin_shortcut(x) if "nin_shortcut" in self else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all grid cells, with 1x1 convolutions as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).reshape(B, H * W, C) for proj in (self.q, self.k, self.v))
        weights = mx.softmax((q @ k.transpose(0, 2, 1)) * C**-0.5, axis=-1, precise=True)
        return x + self.proj_out((weights @ v).reshape(B, H, W, C))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        return _conv3x3(self.conv, x, pad=(0, 1), stride=2)  # padded right and bottom only


class EncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, attention: bool):
        super().__init__()
        self.resnet = ResnetBlock(in_channels, out_channels)
        if attention:
            self.attention = AttnBlock(out_channels)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnet(x)
        return self.attention(x) if "attention" in self else x


class EncoderStage(nn.Module):
    def __init__(self, config: dict[str, Any], stage: int):
        super().__init__()
        mult = config["channel_multiplier"]
        channels = config["base_channels"] * (1 if stage == 0 else mult[stage - 1])
        out = config["base_channels"] * mult[stage]
        attention = config["resolution"] // 2**stage in config["attn_resolutions"]
        self.layers = []
        for _ in range(config["num_res_blocks"]):
            self.layers.append(EncoderBlock(channels, out, attention))
            channels = out
        if stage < len(mult) - 1:
            self.downsample = Downsample(out)

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return self.downsample(x) if "downsample" in self else x


class MiddleBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        channels = config["base_channels"] * config["channel_multiplier"][-1]
        self.conv_in = nn.Conv2d(config["in_channels"], config["base_channels"], 3)  # padded by _conv3x3
        self.stages = [EncoderStage(config, i) for i in range(len(config["channel_multiplier"]))]
        self.mid = MiddleBlock(channels)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, config["latent_channels"], 3)

    def __call__(self, x: mx.array) -> mx.array:
        x = _conv3x3(self.conv_in, x)
        for stage in self.stages:
            x = stage(x)
        return _conv3x3(self.conv_out, _swish(self.norm_out(self.mid(x))))


class Quantizer(nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.embedding = nn.Linear(config["embed_dim"], config["codebook_size"], bias=False)

    def __call__(self, latents: mx.array) -> mx.array:
        """(N, embed_dim) latents to (N,) codebook indices: the largest dot product wins."""
        rows = max(1, _ARGMAX_CHUNK // self.embedding.weight.shape[0])
        codes = [mx.argmax(self.embedding(latents[i : i + rows]), axis=-1) for i in range(0, latents.shape[0], rows)]
        return mx.concatenate(codes) if len(codes) > 1 else codes[0]


class VisionTokenizer(nn.Module):
    """EMU3.5's encode-only image tokenizer; parameter names are the checkpoint's, under `model.vision_tokenizer.`."""

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        self.config = vision_config(config or {})
        self.encoder = Encoder(self.config)
        self.quant_conv = nn.Conv2d(self.config["latent_channels"], self.config["embed_dim"], 1)
        self.quantize = Quantizer(self.config)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.config["channel_multiplier"]) - 1)

    def __call__(self, pixels: mx.array) -> mx.array:
        """(H, W, 3) pixels in [-1, 1] to the (H / 16, W / 16) grid of codebook indices."""
        latents = self.quant_conv(self.encoder(pixels.astype(mx.float32)[None]))[0]
        h, w, d = latents.shape
        return self.quantize(latents.reshape(h * w, d)).reshape(h, w)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint tensors (prefix already stripped) in our layout: float32, convolutions channels-last."""
        out = {}
        for name, w in weights.items():
            w = w.astype(mx.float32)
            out[name] = w.transpose(0, 2, 3, 1) if w.ndim == 4 else w  # (O, I, kh, kw) -> (O, kh, kw, I)
        return out


def vision_config(config: dict[str, Any]) -> dict[str, Any]:
    """A full `vision_config` (the reference's defaults filled in), checked for what the encoder needs."""
    out = {**DEFAULT_VISION_CONFIG, **{k: v for k, v in config.items() if k in DEFAULT_VISION_CONFIG}}
    widths = [out["base_channels"] * m for m in out["channel_multiplier"]]
    if not out["channel_multiplier"] or any(w % 32 for w in [out["base_channels"], *widths]):
        raise ConfigError(
            f"config.json: vision_config channel widths {[out['base_channels'], *widths]} must be multiples of 32 "
            "(GroupNorm with 32 groups)"
        )
    return out


# ---- an image as token ids ----------------------------------------------------------------------------------------


class ImageTokenizer:
    """Images as Apertus 1.5 token ids, for one checkpoint directory and its tokenizer.

    `image_token_ids(image)` gives one image's ids (markers and visual ids), `encode(text, images)` a whole
    prompt whose `<|image|>` placeholders take the images in order. Weights load on the first image.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Any, config: dict[str, Any] | None = None):
        self.path = Path(path)
        if config is None:
            from .load import load_config

            config = load_config(self.path)
        if config.get("model_type") != "apertus1p5":
            raise ConfigError(
                f"{self.path}: images need a full Apertus 1.5 checkpoint (model_type 'apertus1p5'), "
                f"this one is {config.get('model_type')!r}"
            )
        self.config = config
        self.vision = vision_config(config.get("vision_config") or {})
        self.settings = ImageSettings.from_dir(self.path)
        factor = 2 ** (len(self.vision["channel_multiplier"]) - 1)
        if self.settings.spatial_factor != factor:
            raise ConfigError(
                f"{self.path}: the image processor's spatial_factor {self.settings.spatial_factor} is not the "
                f"vision tokenizer's downsampling factor {factor}"
            )
        self.offset = int(config.get("image_token_offset", 131272))
        self.tokenizer = tokenizer
        self.markers = {key: _marker(tokenizer, key, default) for key, default in DEFAULT_MARKERS.items()}
        self.placeholder_id = _token_id(tokenizer, self.markers["image_token"])
        for text in self.markers.values():
            _token_id(tokenizer, text)
        self.audio_token = getattr(tokenizer, "audio_token", None) or DEFAULT_AUDIO_TOKEN
        self._model: VisionTokenizer | None = None
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, tokenizer: Any | None = None) -> ImageTokenizer:
        from .load import load_tokenizer, resolve

        path = resolve(path_or_repo)
        return cls(path, tokenizer if tokenizer is not None else load_tokenizer(path))

    @property
    def model(self) -> VisionTokenizer:
        """The vision tokenizer, its weights read from the checkpoint on first use."""
        if self._model is None:
            self._model = _load_vision_tokenizer(self.path, self.vision)
        return self._model

    def pixel_values(self, image: Any) -> np.ndarray:
        return pixel_values(image, self.settings)

    def codes(self, image: Any) -> np.ndarray:
        """The (rows, cols) grid of codebook indices of one image (no offset)."""
        pixels = mx.array(self.pixel_values(image))
        codes = self.model(pixels)
        mx.eval(codes)
        return np.array(codes).astype(np.int64)

    def expansion(self, rows: int, cols: int) -> str:
        """The text a `<|image|>` placeholder becomes, one placeholder left per code (the reference's string)."""
        m = self.markers
        grid = m["eol_token"].join([m["image_token"] * cols] * rows)
        return f"{m['boi_token']}{rows}*{cols}{m['image_wrapper_token']}{grid}{m['eoi_token']}"

    def grid(self, image: Any) -> np.ndarray:
        """`codes(image)`, from a small cache keyed by the image's content when it was seen before."""
        key = _content_key(image)
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        codes = self.codes(image)
        if key is not None:
            self._cache[key] = codes
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return codes

    def image_token_ids(self, image: Any) -> list[int]:
        """One image's token ids: markers, the size as text, and its visual ids row by row."""
        codes = self.grid(image)
        return self._fill(self._encode_text(self.expansion(*codes.shape)), [codes])

    def encode(self, text: str, images: Sequence[Any] = (), add_special_tokens: bool = False) -> list[int]:
        """Token ids of a prompt whose `<|image|>` placeholders take `images` in order, as the reference
        processor lays them out: the expanded text tokenized at once, then codes in the placeholders' places."""
        if self.audio_token in text:
            raise ApertusError(f"audio input ({self.audio_token} in the prompt) is not supported")
        placeholder = self.markers["image_token"]
        pieces = text.split(placeholder)
        if len(pieces) - 1 != len(images):
            raise ImageError(
                f"the prompt has {len(pieces) - 1} {placeholder} placeholder(s) for {len(images)} image(s)"
            )
        return self.encode_grids(text, [self.grid(image) for image in images], add_special_tokens)

    def encode_grids(self, text: str, grids: Sequence[np.ndarray], add_special_tokens: bool = False) -> list[int]:
        """`encode` with the images' code grids already computed (`grid(image)`), in the placeholders' order."""
        if self.audio_token in text:
            raise ApertusError(f"audio input ({self.audio_token} in the prompt) is not supported")
        placeholder = self.markers["image_token"]
        pieces = text.split(placeholder)
        if len(pieces) - 1 != len(grids):
            raise ImageError(f"the prompt has {len(pieces) - 1} {placeholder} placeholder(s) for {len(grids)} image(s)")
        expanded = pieces[0] + "".join(self.expansion(*g.shape) + p for g, p in zip(grids, pieces[1:], strict=True))
        return self._fill(self._encode_text(expanded, add_special_tokens), list(grids))

    def _encode_text(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _fill(self, ids: list[int], grids: list[np.ndarray]) -> list[int]:
        """`ids` with its placeholder ids replaced, in order, by the images' codes plus `image_token_offset`."""
        codes = np.concatenate([g.reshape(-1) for g in grids]) if grids else np.zeros(0, np.int64)
        out = np.asarray(ids, dtype=np.int64)
        slots = np.flatnonzero(out == self.placeholder_id)
        if len(slots) != len(codes):
            raise ImageError(
                f"the tokenized prompt has {len(slots)} {self.markers['image_token']} slots for {len(codes)} codes"
            )
        out[slots] = codes + self.offset
        return out.tolist()


def _marker(tokenizer: Any, key: str, default: str) -> str:
    value = getattr(tokenizer, key, None)
    return value if isinstance(value, str) and value else default


def _token_id(tokenizer: Any, text: str) -> int:
    """The one id of a marker token; a ConfigError when the tokenizer does not have it as a token."""
    token = tokenizer.convert_tokens_to_ids(text)
    if not isinstance(token, int) or token == getattr(tokenizer, "unk_token_id", None):
        raise ConfigError(f"the tokenizer has no {text} token, which Apertus 1.5's image input needs")
    return token


def _content_key(image: Any) -> str | None:
    """A hash of the image's content: the file's or the bytes' (encoded), or a PIL image's mode, size and pixels."""
    from PIL import Image

    digest = hashlib.sha256()
    if isinstance(image, (bytes, bytearray, memoryview)):
        digest.update(b"bytes:" + bytes(image))
    elif isinstance(image, (str, os.PathLike)):
        try:
            digest.update(b"bytes:" + Path(image).expanduser().read_bytes())
        except OSError:
            return None  # open_image gives the error
    elif isinstance(image, Image.Image):
        digest.update(f"pil:{image.mode}:{image.size}:".encode() + image.tobytes())
    else:
        return None
    return digest.hexdigest()


def _load_vision_tokenizer(path: Path, config: dict[str, Any]) -> VisionTokenizer:
    """The vision tokenizer with its `model.vision_tokenizer.*` tensors from the checkpoint, as float32."""
    from mlx.utils import tree_flatten

    found, origin = _read_vision_weights(path)
    if not found:
        raise CheckpointError(f"{path}: no {PREFIX}* tensors; this checkpoint cannot read images")
    model = VisionTokenizer(config)
    found = model.sanitize(found)
    expected = dict(tree_flatten(model.parameters()))
    if missing := [k for k in expected if k not in found]:
        raise CheckpointError(f"checkpoint lacks tensor {PREFIX}{missing[0]}")
    if extra := [k for k in found if k not in expected]:
        raise CheckpointError(f"{origin.get(PREFIX + extra[0], 'checkpoint')}: unexpected tensor {PREFIX}{extra[0]}")
    for name, param in expected.items():
        if found[name].shape != param.shape:
            raise CheckpointError(
                f"{origin.get(PREFIX + name, 'checkpoint')}: tensor {PREFIX}{name} does not fit config.json's "
                f"vision_config (shape {tuple(found[name].shape)}, expected {tuple(param.shape)})"
            )
    model.load_weights(list(found.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model


def _read_vision_weights(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """The `model.vision_tokenizer.*` tensors (prefix stripped, memory-mapped: only these are read) and their files."""
    from .load import _read_weights

    weights, origin = _read_weights(path)
    found = {name[len(PREFIX) :]: w for name, w in weights.items() if name.startswith(PREFIX)}
    return found, {name: origin[name] for name in weights if name.startswith(PREFIX)}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---- images in chats: URLs, and the image tokenizer of a loaded model ------------------------------------------------


def image_url(image: Any) -> str:
    """An image (a path, encoded bytes, a PIL image, or already a `data:` / `file://` URL) as a self-contained
    `data:` URL, as a chat keeps it: a saved chat then re-renders the same wherever the file went.

    Files and bytes are kept as they are (checked to be an image); a PIL image is stored as PNG, or, in a mode PNG
    cannot hold, as the RGB pixels the image pipeline would read from it.
    """
    from PIL import Image

    if isinstance(image, str) and image.startswith("data:"):
        image_source(image)  # a bad data: URL is refused now
        return image
    if isinstance(image, str) and (image.startswith("file:") or "://" in image):
        image = image_source(image)  # a local file, or the refusal of a URL that would need fetching
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        try:
            image.save(buffer, format="PNG")
        except (OSError, ValueError, KeyError):
            buffer = io.BytesIO()
            Image.fromarray(rgb_array(image)).save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "image/png"
    else:
        open_image(image)  # the one-line errors: no such file, not an image, ...
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
        else:
            data = Path(image).expanduser().read_bytes()
        with Image.open(io.BytesIO(data)) as opened:
            mime = Image.MIME.get(opened.format or "", "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_source(url: str) -> bytes | Path:
    """What an image part's URL points to: the bytes of a base64 `data:` URL, or the local file of a `file://`
    URL or a path. http(s) URLs are refused: nothing is fetched from the network."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ImageError(f"image URL {url[:40]}…: only base64 data: URLs are supported (data:image/png;base64,…)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(f"image URL {header},…: the base64 data is corrupt") from None
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        raise ImageError(f"image URL {url}: http(s) URLs are not fetched; pass a data: URL or a local file")
    if scheme == "file":
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ImageError(f"image URL {url}: only local files (file:///path) are read")
        return Path(unquote(parsed.path))
    if len(scheme) > 1:  # a one-letter scheme is a Windows drive
        raise ImageError(f"image URL {url[:60]}: unsupported scheme {scheme!r}; pass a data: URL or a local file")
    return Path(url).expanduser()


def url_key(url: str) -> str | None:
    """A key for an image URL's codes: a `data:` URL by its text (it holds the image), a file by its content."""
    if url.startswith("data:"):
        return hashlib.sha256(b"url:" + url.encode()).hexdigest()
    return _content_key(image_source(url))


def for_model(model: Any, tokenizer: Any) -> ImageTokenizer:
    """The `ImageTokenizer` of a loaded model (made on first use, kept on the model; its weights load on the
    first image). A model that cannot read images is refused in one line naming it."""
    cached = getattr(model, "_image_tokenizer", None)
    if cached is not None and cached.tokenizer is tokenizer:
        return cached
    path = getattr(model, "checkpoint_path", None)
    model_type = getattr(getattr(model, "args", None), "model_type", None)
    name = f"model {Path(path).name!r}" if path is not None else "this model"
    if model_type != "apertus1p5":
        raise ApertusError(
            f"{name} (model_type {model_type!r}) cannot read images: it has no vision tokenizer "
            "(images need a full Apertus 1.5 checkpoint, model_type 'apertus1p5')"
        )
    if path is None:
        raise ApertusError(f"{name} cannot read images: it was not loaded from a checkpoint directory")
    tokenizer_ = ImageTokenizer(path, tokenizer, model.args.extra or None)
    model._image_tokenizer = tokenizer_
    return tokenizer_
