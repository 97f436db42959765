"""Chat speed, ours vs mlx-lm's own `stream_generate`, on the same weights in one run.

    python -m bench.chat_speed                       # the yardstick `small` model (CPU-friendly)
    python -m bench.chat_speed --shape 8b --bits 4   # random weights in the Apertus-8B shape, 4-bit g64
    python -m bench.chat_speed --shape 8b --bits 4 --sessions 1,4,8 --no-single   # concurrent sessions only

Measures prompt tokens/s, generation tokens/s, time to first token of turn 5 of a chat, and peak
memory, each the median of `--repeats` alternating runs after a warm-up, and prints ours / mlx-lm.
On turn 5 we prefill only the new tokens; mlx-lm's `generate` re-reads the whole chat, as it does
when called once per turn. Writes the numbers as JSON with `--out`.

With `--sessions`, also N concurrent sessions on one `Engine` against mlx-lm's `BatchGenerator`: aggregate
decode tokens/s, a new session's first token while 3 others decode, and batched vs solo greedy tokens
(see `bench/concurrency.py`); the JSON's `concurrency` key holds those numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

import apertus_mlx
from apertus_mlx import ChatSession, SamplingOptions

from . import concurrency
from .shapes import SHAPES, SMALL, random_model, save_layer_by_layer

TEXT = (
    "Apertus ist ein vollständig offenes Sprachmodell aus der Schweiz. It was trained on openly licensed "
    "data in more than a thousand languages. Le modèle respecte les demandes de retrait des sites web. "
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_weights(args, workdir: Path) -> Path:
    """An MLX checkpoint both implementations read: the given model re-saved, or random weights of a shape."""
    if args.shape:
        model, config = random_model(args.shape)
        source = SMALL  # tokenizer and chat template
    else:
        source = apertus_mlx.resolve(args.model or SMALL)
        model = apertus_mlx.load_model(source, lazy=True)
        config = json.loads((source / "config.json").read_text())
    if args.bits and not isinstance(model.layers[0].mlp.up_proj, nn.QuantizedLinear):
        nn.quantize(model, group_size=args.group_size, bits=args.bits)
    return save_layer_by_layer(model, config, workdir / "weights", copy_from=source)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def chat_turns(prompt_tokens: int, turns: int) -> list[str]:
    """User messages: a long first one, then short follow-ups, as a chat goes."""
    first = (TEXT * (prompt_tokens // 40 + 1))[: prompt_tokens * 4]
    return [first] + [f"Frage {i}: {TEXT[: 120 + 10 * i]}" for i in range(2, turns + 1)]


def run_ours(model, tokenizer, messages: list[str], gen: int) -> dict:
    mx.reset_peak_memory()  # the engine leaves the process-wide peak alone; the benchmark resets it per side
    session = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=gen, temperature=0))
    stats = []
    for text in messages:
        *_, done = session.stream(text)
        stats.append(done.stats)
    first, last = stats[0], stats[-1]
    return {
        "prompt_tps": first.prompt_tps,
        "generation_tps": median([s.generation_tps for s in stats]),
        "ttft_last_turn": last.time_to_first_token,
        "peak_memory_gb": max(s.peak_memory_gb for s in stats),
        "prompts": [s.prompt_tokens for s in stats],
        "history": session.messages,
    }


def run_mlx_lm(model, tokenizer, prompts: list[list[int]], gen: int) -> dict:
    sampler = make_sampler(0.0)
    results = []
    for prompt in prompts:
        mx.reset_peak_memory()
        start = time.perf_counter()
        ttft, last = None, None
        for last in stream_generate(model, tokenizer, prompt, max_tokens=gen, sampler=sampler):  # noqa: B007
            ttft = ttft or time.perf_counter() - start
        results.append((last, ttft))
    first, last = results[0][0], results[-1]
    return {
        "prompt_tps": first.prompt_tps,
        "generation_tps": median([r.generation_tps for r, _ in results]),
        "ttft_last_turn": last[1],
        "peak_memory_gb": max(r.peak_memory for r, _ in results),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory or repo id (default: the yardstick `small` model)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights of a published Apertus shape instead")
    p.add_argument("--bits", type=int, help="quantize to this many bits first (affine)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=512, help="length of the first prompt")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens generated per turn")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    g = p.add_argument_group("concurrent sessions (one Engine) vs mlx-lm's BatchGenerator")
    g.add_argument("--sessions", type=_counts, help="comma-separated session counts, e.g. 1,4,8 (default: skip)")
    g.add_argument("--session-prompt-tokens", type=int, default=512, help="each session's prompt (whole chat)")
    g.add_argument("--max-tokens", type=int, default=128, help="tokens each concurrent session generates")
    g.add_argument("--busy-tokens", type=int, default=512, help="the 3 sessions decoding while a 4th starts: at most")
    g.add_argument("--agree-batch", type=int, default=4, help="batch size of the batched vs solo comparison")
    g.add_argument("--no-single", action="store_true", help="skip the single-session comparison")
    args = p.parse_args(argv)

    label = (args.shape and f"random {args.shape}") or str(args.model or "yardstick small")
    quant = f", {args.bits}-bit g{args.group_size}" if args.bits else ""
    out: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "device": str(mx.default_device())}
    with tempfile.TemporaryDirectory(prefix="chat-speed-") as tmp:
        weights = prepare_weights(args, Path(tmp))
        if not args.no_single:
            out.update(single_session(args, weights, label + quant))
        if args.sessions:
            out["concurrency"] = concurrent_sessions(args, weights, label + quant)
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    return 0


def single_session(args, weights: Path, label: str) -> dict:
    """One chat of `--turns` turns, ours vs `stream_generate`; prints the table, returns the numbers."""
    log("loading with apertus-mlx and with mlx-lm")
    ours_model, ours_tok = apertus_mlx.load(weights)
    theirs_model, theirs_tok = mlx_lm_load(str(weights))
    for tok in (ours_tok, theirs_tok):  # every run generates exactly --gen-tokens tokens
        tok.eos_token_ids = set()
    messages = chat_turns(args.prompt_tokens, args.turns)

    runs = {"ours": [], "mlx-lm": []}
    for i in range(args.repeats + 1):  # the first round warms up and is discarded
        ours = run_ours(ours_model, ours_tok, messages, args.gen_tokens)
        # mlx-lm gets the very same prompt tokens, one full prompt per turn.
        history = ours.pop("history")
        prompts = []
        for turn in range(args.turns):
            session = ChatSession(ours_model, ours_tok)
            session.messages = history[: 2 * turn + 1]  # turns so far and the new question
            prompts.append(session.render())
        assert [len(x) for x in prompts] == ours.pop("prompts")
        theirs = run_mlx_lm(theirs_model, theirs_tok, prompts, args.gen_tokens)
        if i:
            runs["ours"].append(ours)
            runs["mlx-lm"].append(theirs)
        warm = " (warm-up)" if i == 0 else ""
        log(f"round {i}/{args.repeats}{warm}: ours {_short(ours)} | mlx-lm {_short(theirs)}")

    keys = ["prompt_tps", "generation_tps", "ttft_last_turn", "peak_memory_gb"]
    summary = {side: {k: median([r[k] for r in rs]) for k in keys} for side, rs in runs.items()}
    ratios = {k: summary["ours"][k] / summary["mlx-lm"][k] for k in keys}
    better = {"prompt_tps": "higher", "generation_tps": "higher", "ttft_last_turn": "lower", "peak_memory_gb": "lower"}
    print(f"\nchat speed on {mx.default_device()} | {label}")
    print(
        f"first prompt {len(prompts[0])} tokens, {args.gen_tokens} generated per turn, "
        f"turn {args.turns} prompt {len(prompts[-1])} tokens"
    )
    print(f"{'metric':<26}{'ours':>12}{'mlx-lm':>12}{'ours/mlx-lm':>14}  better")
    names = {
        "prompt_tps": "prompt tok/s",
        "generation_tps": "generation tok/s",
        "ttft_last_turn": f"first token, turn {args.turns} (s)",
        "peak_memory_gb": "peak memory (GB)",
    }
    for k in keys:
        print(f"{names[k]:<26}{summary['ours'][k]:>12.3f}{summary['mlx-lm'][k]:>12.3f}{ratios[k]:>14.3f}  {better[k]}")
    return {"summary": summary, "ratios": ratios, "runs": runs}


def concurrent_sessions(args, weights: Path, label: str) -> dict:
    """`--sessions` concurrent sessions on one Engine vs `BatchGenerator`; prints the tables, returns the numbers."""
    log("loading an Engine and, for mlx-lm, the same weights")
    engine = apertus_mlx.Engine(weights).wait_ready()
    try:
        engine.tokenizer.eos_token_ids = set()  # every turn runs to its max_tokens, as mlx-lm's (no stop tokens)
        theirs_model, _ = mlx_lm_load(str(weights))
        dtype, quantized = engine.call(_precision, engine.model).result()
        result = {"dtype": dtype, "quantization": quantized, **concurrency.run(engine, theirs_model, args)}
    finally:
        engine.close()
    print(f"\nconcurrent sessions on {mx.default_device()} | {label} | {dtype}")
    print(
        f"prompts of {max(result['prompt_tokens'])} tokens, {args.max_tokens} generated each, "
        f"median of {args.repeats} after a warm-up\n"
    )
    print(concurrency.markdown(result))
    return result


def _precision(model) -> tuple[str, str | None]:
    """The model's float type (e.g. "float32") and its layers' quantization (e.g. "4-bit g64"), if any."""
    dtype = str(model.model.norm.weight.dtype).removeprefix("mlx.core.")
    linear = model.layers[0].mlp.up_proj
    quantized = isinstance(linear, nn.QuantizedLinear)
    return dtype, f"{linear.bits}-bit g{linear.group_size}" if quantized else None


def _counts(text: str) -> list[int]:
    counts = [int(x) for x in text.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected session counts like 1,4,8, got {text!r}")
    return counts


def _short(r: dict) -> str:
    return f"pp {r['prompt_tps']:.0f} tg {r['generation_tps']:.1f} ttft5 {r['ttft_last_turn']:.3f}s"


if __name__ == "__main__":
    sys.exit(main())
