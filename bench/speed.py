"""Decode and prefill speed, ours vs mlx-lm's `stream_generate`, per shape and precision, on the very same files.

    python -m bench.speed                                   # the shipped shapes and precisions (a GPU's work)
    python -m bench.speed --shapes 0.5b --precisions bf16 int4 --out docs/bench/speed
    python -m bench.speed --model bench/yardstick/models/small --precisions bf16 int4   # a real model, CPU-sized

For each (shape, precision) it writes random weights of that shape in mlx-lm's checkpoint format (so both sides
load the same files), then, interleaved and after a warm-up round, `--repeats` times each: one chat turn of
ours (`ChatSession`), ours again on the plain forward (without the compiled decode step, the ablation), and
`stream_generate`, on the same prompt tokens (`--prompt-tokens`, default 2,048), generating `--gen-tokens`.
Reported: decode tok/s (median), the decode ratios (median of the rounds' ratios), prefill tok/s, peak memory and
their ratios, and decode's share of the memory-bandwidth roofline (bytes of weights read per token x tok/s /
`--bandwidth`). Then a chat of `--turns` turns of equal length (ours only): the first token of the last turn over
the first turn's.

Prints a table; with `--out PREFIX`, writes PREFIX.json, PREFIX.md and a bar chart PREFIX.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load

import apertus_mlx
from apertus_mlx import ChatSession, SamplingOptions

from .chat_speed import TEXT, log, run_mlx_lm
from .shapes import SHAPES, SMALL, random_model, save_layer_by_layer

PRECISIONS = ("bf16", "int2", "int3", "int4", "int6", "int8", "mix")
H200_BANDWIDTH = 4.8e12  # bytes/s (NVIDIA's H200 datasheet); pass --bandwidth for another machine


def quantize(model: nn.Module, precision: str) -> None:
    """`intN`: every projection and the embedding at N bits, g64. `mix`: a `budget`-style mix of widths (attention
    4-bit, MLP 3-bit, the first and last layers and the embedding 6-bit), the shape of what the budget recipe makes."""
    if precision == "bf16":
        return
    if precision.startswith("int"):
        nn.quantize(model, group_size=64, bits=int(precision[3:]))
        return
    last = len(model.layers) - 1

    def width(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized"):
            return False
        layer = int(path.split(".")[2]) if ".layers." in path else None
        bits = 6 if layer in (None, 0, last) else (4 if "self_attn" in path else 3)
        return {"group_size": 64, "bits": bits}

    nn.quantize(model, class_predicate=width)


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter but the embedding table (one row), which a tied
    head reads whole."""
    total = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    embedding = sum(a.nbytes for _, a in tree_flatten(model.model.embed_tokens.parameters()))
    return total if model.args.tie_word_embeddings else total - embedding


def prompt_text(tokens: int) -> str:
    return (TEXT * (tokens // 40 + 1))[: tokens * 4]


def run_ours(model, tokenizer, messages: list[str], gen: int) -> dict[str, Any]:
    mx.reset_peak_memory()
    session = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=gen, temperature=0))
    stats = [list(session.stream(text))[-1].stats for text in messages]
    return {
        "prompt_tps": stats[0].prompt_tps,
        "generation_tps": stats[0].generation_tps,
        "peak_memory_gb": max(s.peak_memory_gb for s in stats),
        "ttft": [s.time_to_first_token for s in stats],
        "prompt_tokens": [s.prompt_tokens for s in stats],
        "history": session.messages,
    }


def measure(weights: Path, args) -> dict[str, Any]:
    """Ours vs mlx-lm on one checkpoint: medians of interleaved rounds, then the long chat (ours)."""
    ours_model, ours_tok = apertus_mlx.load(weights)
    theirs_model, theirs_tok = mlx_lm_load(str(weights))
    for tok in (ours_tok, theirs_tok):  # every run generates exactly --gen-tokens tokens
        tok.eos_token_ids = set()
    message = [prompt_text(args.prompt_tokens)]
    rounds: dict[str, list[dict]] = {"ours": [], "plain": [], "mlx-lm": []}
    for i in range(args.repeats + 1):  # the first round warms up (compilation, allocation) and is dropped
        ours = run_ours(ours_model, ours_tok, message, args.gen_tokens)
        ours_model.compiled_decode = False  # the ablation: our engine on the plain forward
        plain = run_ours(ours_model, ours_tok, message, args.gen_tokens)
        ours_model.compiled_decode = True
        tokens = ChatSession(ours_model, ours_tok)
        tokens.messages = ours.pop("history")[:1]
        plain.pop("history")
        theirs = run_mlx_lm(theirs_model, theirs_tok, [tokens.render()], args.gen_tokens)
        if i:
            for side, result in (("ours", ours), ("plain", plain), ("mlx-lm", theirs)):
                rounds[side].append(result)
        rates = f"ours {ours['generation_tps']:.1f} tok/s, plain {plain['generation_tps']:.1f}, "
        rates += f"mlx-lm {theirs['generation_tps']:.1f}"
        log(f"  round {i}/{args.repeats}: {rates}")
    keys = ("generation_tps", "prompt_tps", "peak_memory_gb")
    result = {side: {k: statistics.median(r[k] for r in rs) for k in keys} for side, rs in rounds.items()}
    result["rounds"] = {side: [r["generation_tps"] for r in rs] for side, rs in rounds.items()}
    result["prompt_tokens"] = rounds["ours"][0]["prompt_tokens"][0]
    chat = run_ours(ours_model, ours_tok, [prompt_text(args.turn_tokens)] * args.turns, args.gen_tokens // 4)
    result["ttft_turns"] = chat["ttft"]
    result["weight_bytes_per_token"] = weight_bytes_per_token(ours_model)
    del ours_model, theirs_model
    mx.clear_cache()
    return result


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median of round-by-round ratios: the sides of one round share the machine's state of the moment,
    so on a machine whose speed drifts this is steadier than a ratio of medians."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def summarize(name: str, r: dict[str, Any], bandwidth: float) -> dict[str, Any]:
    ours, theirs, rounds = r["ours"], r["mlx-lm"], r["rounds"]
    return {
        "name": name,
        "decode_ours": ours["generation_tps"],
        "decode_mlx_lm": theirs["generation_tps"],
        "decode_ratio": paired_ratio(rounds["ours"], rounds["mlx-lm"]),
        "decode_plain": r["plain"]["generation_tps"],
        "compiled_gain": paired_ratio(rounds["ours"], rounds["plain"]),
        "prefill_ratio": ours["prompt_tps"] / theirs["prompt_tps"],
        "memory_ratio": ours["peak_memory_gb"] / theirs["peak_memory_gb"],
        "roofline_ours": r["weight_bytes_per_token"] * ours["generation_tps"] / bandwidth,
        "roofline_mlx_lm": r["weight_bytes_per_token"] * theirs["generation_tps"] / bandwidth,
        "turn_ttft_ratio": r["ttft_turns"][-1] / r["ttft_turns"][0],
    }


def table(rows: list[dict[str, Any]], turns: int) -> str:
    lines = [
        "| model | decode tok/s ours | mlx-lm | ours / mlx-lm | compiled / plain step | prefill ratio | "
        f"peak memory ratio | roofline ours | mlx-lm | turn {turns} / turn 1 first token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['decode_ours']:.1f} | {r['decode_mlx_lm']:.1f} | {r['decode_ratio']:.2f}x | "
            f"{r['compiled_gain']:.2f}x | {r['prefill_ratio']:.2f}x | {r['memory_ratio']:.2f}x | "
            f"{r['roofline_ours']:.1%} | {r['roofline_mlx_lm']:.1%} | {r['turn_ttft_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4))
    ax.bar([i - 0.27 for i in x], [r["decode_ours"] for r in rows], 0.27, label="apertus-mlx")
    ax.bar(list(x), [r["decode_plain"] for r in rows], 0.27, label="apertus-mlx, plain forward")
    ax.bar([i + 0.27 for i in x], [r["decode_mlx_lm"] for r in rows], 0.27, label="mlx-lm stream_generate")
    tops = [max(r["decode_ours"], r["decode_plain"], r["decode_mlx_lm"]) for r in rows]
    for i, (r, top) in enumerate(zip(rows, tops, strict=True)):  # ours over mlx-lm
        ax.annotate(f"{r['decode_ratio']:.2f}x", (i, top), ha="center", va="bottom")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("decode; above the bars: apertus-mlx / mlx-lm", fontsize="medium")
    ax.set_ylim(0, 1.3 * max(tops))  # room for the legend above the bars
    ax.legend(loc="upper left", ncol=3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["0.5b", "4b", "8b"], choices=sorted(SHAPES))
    p.add_argument("--model", type=Path, help="a real bf16 checkpoint instead of random shapes")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--turn-tokens", type=int, default=128, help="user text per turn of the long chat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH, help="peak memory bandwidth, bytes/s")
    p.add_argument("--out", type=Path, help="write PREFIX.json, PREFIX.md and PREFIX.png")
    args = p.parse_args(argv)

    sources = [(str(args.model), None)] if args.model else [(s, s) for s in args.shapes]
    rows, raw = [], {}
    started = time.monotonic()
    for source, shape in sources:
        for precision in args.precisions:
            name = f"{Path(source).name} {precision}"
            log(f"{name}: writing weights ({time.monotonic() - started:.0f} s so far)")
            with tempfile.TemporaryDirectory(prefix="speed-") as tmp:
                if shape:
                    model, config = random_model(shape)
                    copy_from = SMALL
                else:
                    model = apertus_mlx.load_model(source, lazy=True)
                    config = json.loads((Path(source) / "config.json").read_text())
                    copy_from = Path(source)
                quantize(model, precision)
                weights = save_layer_by_layer(model, config, Path(tmp) / "weights", copy_from=copy_from)
                del model
                raw[name] = measure(weights, args)
            rows.append(summarize(name, raw[name], args.bandwidth))
            log(table(rows[-1:], args.turns).splitlines()[-1])
    page = (
        f"speed on {mx.default_device()} (MLX {mx.__version__}), {args.prompt_tokens}-token prompt, "
        f"{args.gen_tokens} generated, median of {args.repeats} interleaved rounds\n\n" + table(rows, args.turns)
    )
    print(page)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data = {"args": {k: str(v) for k, v in vars(args).items()}, "mlx": mx.__version__, "rows": rows, "raw": raw}
        for suffix, text in ((".json", json.dumps(data, indent=2) + "\n"), (".md", page + "\n")):
            target = args.out.with_name(args.out.name + suffix)  # a prefix may hold dots: "speed-0.5b"
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, target)
        plot(rows, args.out.with_name(args.out.name + ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
