"""Apertus 1.5 chat speed with and without an image, on random weights of a published shape.

    python -m bench.image_turn                          # the tiny 1.5 shape (CPU-friendly)
    python -m bench.image_turn --shape 8b --bits 4      # the 8B: 1.5's vocabularies, the published vision tokenizer

Builds a full `apertus1p5` checkpoint (`bench.shapes.shape_config_1p5`: decoder, split vocabulary, vision
tokenizer, all random) with the yardstick `small` model's tokenizer and chat template plus the five image markers,
then measures, each the median of `--repeats` runs after a warm-up, in fresh chats:

- a text turn: prompt tokens/s, generation tokens/s, time to first token;
- a turn with one `--image-size` image: its encoding (preprocessing and the float32 vision tokenizer; a new
  image every run, so the image cache never answers), then the same three numbers for the prompt that holds its
  codes; "first token" is encoding plus the turn's own first token.

Loading the vision tokenizer (on the first image) is reported once. Writes the numbers as JSON with `--out`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

import apertus_mlx
from apertus_mlx import ChatSession, SamplingOptions
from apertus_mlx.model import Model, ModelArgs
from apertus_mlx.vision import DEFAULT_MARKERS, PREFIX, VisionTokenizer

from .chat_speed import TEXT, log
from .shapes import SHAPES_1P5, SMALL, shape_config_1p5

MARKERS = [*DEFAULT_MARKERS.values(), "<|audio|>"]
IMAGE_SETTINGS = {
    "image_processor": {"size": {"min_pixels": 128 * 128, "max_pixels": 1400 * 1400}, "spatial_factor": 16}
}


def build_checkpoint(shape: str, bits: int | None, group_size: int, out: Path) -> Path:
    """A random full Apertus 1.5 checkpoint of `shape` in `out` (decoder bf16 or quantized, vision float32)."""
    tokenizer = apertus_mlx.load_tokenizer(SMALL)._tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS}, replace_extra_special_tokens=False)
    config = shape_config_1p5(shape, tokenizer.convert_tokens_to_ids(DEFAULT_MARKERS["image_token"]))
    model = Model(ModelArgs.from_config(config))
    model.set_dtype(mx.bfloat16)
    if bits:
        nn.quantize(model, group_size=group_size, bits=bits)
    for i, layer in enumerate(model.layers):  # the 8B is 34 GB in fp32: never all of it at once
        mx.eval(layer.parameters())
        log(f"weights: layer {i + 1}/{len(model.layers)}")
    vision = VisionTokenizer(config["vision_config"])
    mx.eval(vision.parameters())

    def add_media(tmp: Path) -> None:
        # `small`'s generation config and template; not `copy_from=SMALL`, which would look for 1.5 media tensors there.
        for name in ("generation_config.json", "chat_template.jinja"):
            shutil.copy2(SMALL / name, tmp / name)
        tokenizer.save_pretrained(tmp)
        (tmp / "processor_config.json").write_text(json.dumps(IMAGE_SETTINGS))
        tensors = {  # the checkpoint's layout: convolutions (O, I, kh, kw)
            PREFIX + k: (v.transpose(0, 3, 1, 2) if v.ndim == 4 else v) for k, v in tree_flatten(vision.parameters())
        }
        mx.save_safetensors(str(tmp / "model-vision.safetensors"), tensors)
        index = tmp / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"].update(dict.fromkeys(tensors, "model-vision.safetensors"))
            index.write_text(json.dumps(data, indent=2))

    log(f"writing the checkpoint to {out}")
    return apertus_mlx.save_model(out, model, config, before_commit=add_media)


def picture(size: int, seed: int) -> Image.Image:
    """A smooth gradient plus noise, `size` x `size`: a different image for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 / (size - 1), y * 255 / (size - 1), (x + y) % 256], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8))


def turn(model, tokenizer, text: str, gen: int, image: Image.Image | None) -> dict:
    """One turn in a fresh chat; with an image, its encoding is timed apart (then the turn finds its codes)."""
    mx.reset_peak_memory()
    session = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=gen, temperature=0))
    encode = 0.0
    images = [image] if image is not None else None
    if image is not None:
        start = time.perf_counter()
        session.prepare_images([session.user_message(text, images)])
        encode = time.perf_counter() - start
    *_, done = session.stream(text, images=images)
    s = done.stats
    return {
        "prompt_tokens": s.prompt_tokens,
        "generated_tokens": s.generated_tokens,
        "encode_s": encode,
        "prompt_tps": s.prompt_tps,
        "generation_tps": s.generation_tps,
        "ttft_s": encode + s.time_to_first_token,
        "peak_memory_gb": s.peak_memory_gb,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES_1P5), default="tiny")
    p.add_argument("--bits", type=int, help="quantize the decoder to this many bits first (affine)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=256, help="about this many tokens of text in each prompt")
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens generated per turn")
    p.add_argument("--image-size", type=int, default=512, help="the image's side in pixels (square)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="image-turn-") as tmp:
        path = build_checkpoint(args.shape, args.bits, args.group_size, Path(tmp) / "weights")
        model, tokenizer = apertus_mlx.load(path)
        tokenizer.eos_token_ids = set()  # every turn generates exactly --gen-tokens tokens
        text = (TEXT * (args.prompt_tokens // 40 + 1))[: args.prompt_tokens * 4] + " What is in the picture?"
        start = time.perf_counter()
        ChatSession(model, tokenizer).image_tokenizer().model  # noqa: B018 - loads the vision tokenizer
        vision_load = time.perf_counter() - start
        runs: dict[str, list[dict]] = {"text": [], "image": []}
        for i in range(args.repeats + 1):  # the first round warms up and is discarded
            text_run = turn(model, tokenizer, text, args.gen_tokens, None)
            image_run = turn(model, tokenizer, text, args.gen_tokens, picture(args.image_size, seed=i))
            if i:
                runs["text"].append(text_run)
                runs["image"].append(image_run)
            log(f"round {i}/{args.repeats}{' (warm-up)' if i == 0 else ''}: text {text_run} | image {image_run}")
    summary = {kind: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for kind, rs in runs.items()}
    label = f"random apertus1p5 {args.shape}" + (f", {args.bits}-bit g{args.group_size}" if args.bits else ", bf16")
    print(f"\nimage turn on {mx.default_device()} | {label} | one {args.image_size}x{args.image_size} image")
    print(f"vision tokenizer load (first image): {vision_load:.3f} s")
    print(format_table(summary))
    if args.out:
        out = {"args": {k: str(v) for k, v in vars(args).items()}, "device": str(mx.default_device())}
        args.out.write_text(
            json.dumps({**out, "vision_load_s": vision_load, "summary": summary, "runs": runs}, indent=2)
        )
    return 0


def format_table(summary: dict[str, dict[str, float]]) -> str:
    names = {
        "prompt_tokens": ("prompt tokens", "{:.0f}"),
        "encode_s": ("image encoding (s)", "{:.3f}"),
        "prompt_tps": ("prompt tok/s", "{:.1f}"),
        "generation_tps": ("generation tok/s", "{:.1f}"),
        "ttft_s": ("first token (s)", "{:.3f}"),
        "peak_memory_gb": ("peak memory (GB)", "{:.3f}"),
    }
    lines = ["| metric | text turn | turn with one image |", "|---|---|---|"]
    for key, (name, fmt) in names.items():
        lines.append(f"| {name} | {fmt.format(summary['text'][key])} | {fmt.format(summary['image'][key])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
