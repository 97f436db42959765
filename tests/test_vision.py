"""Apertus 1.5's image input (`apertus_mlx.vision`) against transformers' apertus1p5 reference.

The reference is a tiny random `Apertus1p5ForConditionalGeneration` whose vision tokenizer has the release's shape
in small (five stages, so each side shrinks 16x; a channel change; attention in the last stage and the middle),
written by `save_pretrained` with a tokenizer that names the image markers as the release's does.

transformers' `Apertus1p5ImageProcessor` needs torchvision, which cannot be installed beside the CPU build of torch
that the tests use, so `ReferenceImageProcessor` runs its pipeline from the reference's own parts: its
`smart_resize` (read from its source), transformers' `convert_to_rgb`, then what torchvision's `resize` does with a
uint8 image on the CPU for bicubic filtering (`torch.nn.functional.interpolate(..., antialias=True)` on the uint8
tensor) and the fused rescale-and-normalize in float32. The real `Apertus1p5Processor` expands the placeholders.
"""

from __future__ import annotations

import ast
import io
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from test_apertus1p5 import CHAT_TOKENS, TINY_AUDIO
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Apertus1p5Config,
    Apertus1p5ForConditionalGeneration,
    Apertus1p5Processor,
    PreTrainedTokenizerFast,
)
from transformers.feature_extraction_utils import FeatureExtractionMixin
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_transforms import convert_to_rgb

import apertus_mlx
from apertus_mlx import ApertusError
from apertus_mlx.vision import ImageError, ImageSettings, ImageTokenizer, pixel_values, target_size

from checkpoints import LLAMA3_ROPE, max_rel_error

VOCAB, OUTPUT_VOCAB, CODEBOOK = 512, 384, 64  # visual ids 384..447, audio ids 448..511
MARKERS = {
    "boi_token": "<|img_start|>",
    "eoi_token": "<|img_end|>",
    "image_wrapper_token": "<|img_token_start|>",
    "eol_token": "<|img_end_of_row|>",
    "boa_token": "<|audio_start|>",
    "eoa_token": "<|audio_end|>",
    "image_token": "<|image|>",
    "audio_token": "<|audio|>",
}
# Ids 0..31 are special; the markers sit at 14..21, `<|image|>` at 20 (the config's image_token_id).
SPECIAL = [*CHAT_TOKENS, *MARKERS.values()] + [f"<|reserved_{i}|>" for i in range(22, 32)]
IMAGE_TOKEN_ID = SPECIAL.index("<|image|>")
TINY_VISION = {
    "codebook_size": CODEBOOK,
    "embed_dim": 8,
    "latent_channels": 32,
    "base_channels": 32,
    "channel_multiplier": [1, 1, 1, 1, 2],  # 16x; 32 -> 64 channels in the last stage (a 1x1 shortcut)
    "num_res_blocks": 1,
    "attn_resolutions": [2],  # resolution 32 / 2**4: the last stage attends
    "resolution": 32,
}
# Small limits keep the encoder quick and make the larger test images scale down.
SIZE = {"min_pixels": 32 * 32, "max_pixels": 96 * 96}
PROMPT = "<|user_start|>Look: <|image|> and this<|image|>? What is it?<|user_end|>"


# ---- the reference ----------------------------------------------------------------------------------------------


def _reference_source() -> ast.Module:
    path = Path(transformers.models.apertus1p5.__file__).with_name("image_processing_apertus1p5.py")
    return ast.parse(path.read_text())


def reference_smart_resize():
    """The reference's `smart_resize`, compiled from its source (the module itself imports torchvision)."""
    function = next(n for n in _reference_source().body if getattr(n, "name", None) == "smart_resize")
    namespace = {"math": math}
    exec(compile(ast.Module([function], []), "smart_resize", "exec"), namespace)
    return namespace["smart_resize"]


def reference_defaults() -> dict:
    cls = next(n for n in _reference_source().body if getattr(n, "name", None) == "Apertus1p5ImageProcessor")
    out = {}
    for node in cls.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("size", "spatial_factor"):
                out[name] = eval(compile(ast.Expression(node.value), name, "eval"))
    return out


class ReferenceImageProcessor(BaseImageProcessor):
    """`Apertus1p5ImageProcessor`'s pipeline (see the module docstring), padded batch and true sizes included."""

    model_input_names = ["pixel_values", "image_sizes"]  # noqa: RUF012

    def __init__(self, size=None, spatial_factor=16, **kwargs):
        super().__init__(**kwargs)
        self.size = size or {"min_pixels": 128 * 128, "max_pixels": 1400 * 1400}
        self.spatial_factor = spatial_factor
        self._smart_resize = reference_smart_resize()

    def one(self, image) -> torch.Tensor:
        pixels = torch.from_numpy(convert_to_rgb(image, return_numpy=True)).permute(2, 0, 1).contiguous()
        height, width = pixels.shape[-2:]
        size = self._smart_resize(height, width, self.spatial_factor, self.size["min_pixels"], self.size["max_pixels"])
        if tuple(size) != (height, width):
            pixels = torch.nn.functional.interpolate(
                pixels[None], size=list(size), mode="bicubic", align_corners=False, antialias=True
            )[0]
        mean = torch.tensor([0.5] * 3) * (1.0 / (1 / 255))
        std = torch.tensor([0.5] * 3) * (1.0 / (1 / 255))
        return (pixels.to(torch.float32) - mean[:, None, None]) / std[:, None, None]

    def preprocess(self, images, **kwargs) -> BatchFeature:
        images = images if isinstance(images, list) else [images]
        processed = [self.one(image) for image in images]
        height, width = (max(p.shape[d] for p in processed) for d in (1, 2))
        padded = [torch.nn.functional.pad(p, (0, width - p.shape[2], 0, height - p.shape[1])) for p in processed]
        sizes = [list(p.shape[-2:]) for p in processed]
        return BatchFeature({"pixel_values": torch.stack(padded), "image_sizes": sizes})


def make_reference(seed: int = 0) -> Apertus1p5ForConditionalGeneration:
    torch.manual_seed(seed)
    text = dict(
        vocab_size=VOCAB,
        output_vocab_size=OUTPUT_VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        rope_parameters=dict(LLAMA3_ROPE),
    )
    config = Apertus1p5Config(
        text_config=text,
        vision_config=TINY_VISION,
        audio_config=TINY_AUDIO,
        image_token_id=IMAGE_TOKEN_ID,
        audio_token_id=SPECIAL.index("<|audio|>"),
        image_token_offset=OUTPUT_VOCAB,
        audio_token_offset=OUTPUT_VOCAB + CODEBOOK,
    )
    model = Apertus1p5ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "audio_tokenizer." in name:
                continue
            if "vision_tokenizer." in name:  # convolutions keep their Kaiming init; norms and biases get noise
                if "norm" in name and name.endswith("weight"):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                elif name.endswith("bias"):
                    p.copy_(0.1 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "act_fn" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def save_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE of 384 tokens whose config names the multimodal markers (`extra_special_tokens`)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=OUTPUT_VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Look at this image. What is it? A 3*4 grid, 12*34 cells."] * 8, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=MARKERS,
    )
    fast.save_pretrained(path)
    return fast


def picture(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus noise: structure for the encoder, and every pixel different for the resize."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    noisy = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(noisy)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        image = Image.fromarray(np.dstack([noisy, alpha]), "RGBA")
    return image.convert(mode) if mode not in ("RGB", "RGBA") else image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ref = make_reference()
    path = tmp_path_factory.mktemp("vision") / "ckpt"
    ref.save_pretrained(path)
    tokenizer = save_tokenizer(path)
    (path / "processor_config.json").write_text(json.dumps({"image_processor": {"size": SIZE, "spatial_factor": 16}}))
    processor = Apertus1p5Processor(
        image_processor=ReferenceImageProcessor(size=SIZE),
        feature_extractor=FeatureExtractionMixin(),  # audio: not used here
        tokenizer=tokenizer,
    )
    return ref, path, processor


@pytest.fixture(scope="module")
def ours(checkpoint):
    _, path, _ = checkpoint
    return ImageTokenizer.from_pretrained(path)


IMAGES = {  # (height, width, mode): odd sizes; a transparent one; one scaled down to max_pixels; one scaled up
    "odd-rgb": (37, 53, "RGB"),
    "rgba": (45, 70, "RGBA"),
    "max-pixels": (200, 333, "RGB"),
    "min-pixels-gray": (10, 23, "L"),
}


# ---- preprocessing ----------------------------------------------------------------------------------------------


def test_default_settings_are_the_references():
    defaults = reference_defaults()
    settings = ImageSettings()
    assert defaults["size"] == {"min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels}
    assert defaults["spatial_factor"] == settings.spatial_factor == 16


@pytest.mark.parametrize("size", [SIZE, None], ids=["small-limits", "default-limits"])
@pytest.mark.parametrize("name", list(IMAGES))
def test_pixel_values_match_reference(name, size):
    height, width, mode = IMAGES[name]
    image = picture(height, width, seed=len(name), mode=mode)
    reference = ReferenceImageProcessor(size=size)
    expected = reference.one(image).permute(1, 2, 0).numpy()
    settings = ImageSettings.from_dict({"size": size} if size else {})
    ours = pixel_values(image, settings)
    assert ours.shape == expected.shape and ours.dtype == np.float32
    assert ours.shape[:2] == target_size(height, width, settings)
    assert [s % 16 for s in ours.shape[:2]] == [0, 0]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    if name == "max-pixels" and size:
        assert ours.shape[0] * ours.shape[1] <= SIZE["max_pixels"] < height * width


def test_settings_come_from_processor_config(checkpoint, ours):
    assert ours.settings == ImageSettings(min_pixels=SIZE["min_pixels"], max_pixels=SIZE["max_pixels"])


# ---- codes, ids, logits ------------------------------------------------------------------------------------------


def test_codes_match_reference_exactly(checkpoint, ours):
    ref, _, processor = checkpoint
    assert ours._model is None  # nothing read before the first image
    for name, (height, width, mode) in IMAGES.items():
        image = picture(height, width, seed=len(name), mode=mode)
        inputs = processor.image_processor(image)
        (h, w) = inputs["image_sizes"][0]
        with torch.no_grad():
            expected = ref.model.vision_tokenizer.encode(inputs["pixel_values"][:, :, :h, :w]).image_tokens[0].numpy()
        codes = ours.codes(image)
        assert codes.shape == (h // 16, w // 16)
        np.testing.assert_array_equal(codes, expected)
        assert len(set(codes.ravel().tolist())) > 1  # not a degenerate encoder
    params = dict(ours.model.parameters()["encoder"]["conv_in"])
    assert params["weight"].dtype == mx.float32


def test_banded_convolutions_give_the_same_codes(checkpoint, ours, monkeypatch):
    """Photos run the 3x3 convolutions a band of rows at a time (bounded scratch memory); codes stay exact."""
    from apertus_mlx import vision

    ref, _, processor = checkpoint
    monkeypatch.setattr(vision, "_CONV_BAND", 256)  # a few rows per band even at these sizes
    for seed, (height, width) in enumerate([(64, 48), (40, 72)], start=100):
        image = picture(height, width, seed=seed)
        inputs = processor.image_processor(image)
        (h, w) = inputs["image_sizes"][0]
        with torch.no_grad():
            expected = ref.model.vision_tokenizer.encode(inputs["pixel_values"][:, :, :h, :w]).image_tokens[0].numpy()
        np.testing.assert_array_equal(ours.codes(image), expected)


def reference_ids(ref, processor, images) -> tuple[dict, np.ndarray]:
    """The processor's inputs, and its input_ids with the model's own visual ids in the placeholders."""
    inputs = processor(text=PROMPT, images=images, return_tensors="pt")
    ids = inputs["input_ids"][0].clone()
    with torch.no_grad():
        visual = ref.model.get_image_tokens(inputs["pixel_values"], inputs["image_sizes"])
    ids[ids == IMAGE_TOKEN_ID] = torch.cat(visual)
    return inputs, ids.numpy()


def test_expanded_ids_and_logits_match_reference(checkpoint, ours):
    ref, path, processor = checkpoint
    images = [picture(37, 53, seed=1), picture(200, 333, seed=2)]
    inputs, expected = reference_ids(ref, processor, images)
    ids = ours.encode(PROMPT, images)
    assert ids == expected.tolist()

    # One image's ids, laid out by hand from the tokenizer's markers.
    tok = ours.tokenizer
    marker = tok.convert_tokens_to_ids
    codes = ours.codes(images[0])
    rows, cols = codes.shape
    by_hand = [marker("<|img_start|>"), *tok.encode(f"{rows}*{cols}", add_special_tokens=False)]
    by_hand.append(marker("<|img_token_start|>"))
    for r in range(rows):
        by_hand += (codes[r] + OUTPUT_VOCAB).tolist() + ([marker("<|img_end_of_row|>")] if r < rows - 1 else [])
    by_hand.append(marker("<|img_end|>"))
    assert ours.image_token_ids(images[0]) == by_hand
    assert all(OUTPUT_VOCAB <= i < OUTPUT_VOCAB + CODEBOOK for i in codes.ravel() + OUTPUT_VOCAB)

    model = apertus_mlx.load_model(path)
    with torch.no_grad():
        reference = ref(**inputs).logits.float().numpy()
    logits = np.array(model(mx.array([ids])).astype(mx.float32))
    assert logits.shape == reference.shape == (1, len(ids), OUTPUT_VOCAB)
    assert max_rel_error(logits, reference) <= 1e-4


def test_same_image_is_encoded_once(checkpoint, tmp_path, ours):
    image = picture(40, 41, seed=7)
    file = tmp_path / "picture.png"
    file.write_bytes(png_bytes(image))
    first = ours.image_token_ids(file)
    from_pil = ours.image_token_ids(Image.open(file))  # a PIL image keys by its pixels: encoded once more
    assert from_pil == first

    class Refuse:
        def __call__(self, pixels):
            raise AssertionError("encoded twice")

    model, ours._model = ours._model, Refuse()
    try:
        assert ours.image_token_ids(str(file)) == first  # the same file, by another name
        assert ours.image_token_ids(file.read_bytes()) == first  # the same bytes
        assert ours.image_token_ids(Image.open(file)) == first  # the same pixels
        assert ours.encode("<|image|>", [file]) == first
    finally:
        ours._model = model


# ---- bad inputs -------------------------------------------------------------------------------------------------


def test_bad_inputs_give_one_line_naming_them(ours, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    broken = tmp_path / "broken.png"
    broken.write_bytes(png_bytes(picture(40, 40, seed=3))[:60])
    cases = [
        (text, f"image {text}: not an image file (unknown format)"),
        (broken, f"image {broken}: corrupt or unreadable image ("),
        (tmp_path / "missing.png", f"image {tmp_path / 'missing.png'}: no such file"),
        (b"\x89PNG garbage", "image (12 bytes): not an image file (unknown format)"),
        (42, "image of type int is not supported; pass a path, bytes or a PIL image"),
    ]
    for source, message in cases:
        with pytest.raises(ImageError) as e:
            ours.image_token_ids(source)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_prompt_errors(ours):
    with pytest.raises(ImageError, match=r"^the prompt has 2 <\|image\|> placeholder\(s\) for 1 image\(s\)$"):
        ours.encode(PROMPT, [picture(32, 32, seed=0)])
    with pytest.raises(ApertusError, match=r"^audio input \(<\|audio\|> in the prompt\) is not supported$"):
        ours.encode("Listen: <|audio|>")


def test_text_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "apertus1p5_text"}))
    with pytest.raises(apertus_mlx.ConfigError, match=r"images need a full Apertus 1\.5 checkpoint"):
        ImageTokenizer(tmp_path, tokenizer=None)


def test_sharded_checkpoint(checkpoint, tmp_path, ours):
    ref, path, _ = checkpoint
    ref.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        (tmp_path / name).write_text((path / name).read_text())
    sharded = ImageTokenizer.from_pretrained(tmp_path)
    image = picture(50, 60, seed=11)
    assert sharded.image_token_ids(image) == ours.image_token_ids(image)
