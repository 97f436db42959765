"""`python -m apertus_mlx.generate`: stream one answer to stdout, stats to stderr."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import closing, suppress
from typing import TextIO

from . import __version__
from .engine import Engine
from .errors import ApertusError
from .events import Done, Event, TextDelta, ToolCall, ToolCallError
from .load import DEFAULT_MODEL
from .session import SamplingOptions, check_cache_settings
from .vision import image_url

STOP_WAIT_S = 2.0  # how long an interrupted CLI waits for the MLX thread before it exits without it


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m apertus_mlx.generate",
        description="Chat once with an Apertus model: the answer streams to stdout, stats to stderr.",
    )
    p.add_argument(
        "--model", help=f"model directory or Hugging Face repo id (default: $APERTUS_MODEL, then {DEFAULT_MODEL})"
    )
    p.add_argument("--prompt", "-p", required=True, help="the user message; '-' reads it from stdin")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image the message is about (repeatable; Apertus 1.5 checkpoints with a vision tokenizer)",
    )
    p.add_argument("--system-prompt", help="system message (default: the chat template's own)")
    p.add_argument("--max-tokens", "-m", type=int, default=1024, help="most tokens to generate (default 1024)")
    p.add_argument("--temp", type=float, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens; 0 disables")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this fraction of the top one")
    p.add_argument("--repetition-penalty", type=float, help="penalise recent tokens (e.g. 1.1)")
    p.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--think", action="store_true", help="enable deliberation and show the reasoning, marked apart")
    p.add_argument("--draft-model", help="smaller model with the same tokenizer for speculative decoding")
    p.add_argument("--num-draft-tokens", type=int, default=3, help="tokens the draft proposes per step (default 3)")
    p.add_argument("--kv-bits", type=int, choices=[2, 3, 4, 5, 6, 8], help="quantize the KV cache to this many bits")
    p.add_argument("--kv-group-size", type=int, default=64, help="group size of the quantized KV cache (default 64)")
    p.add_argument("--max-kv-size", type=int, help="keep at most this many tokens in the KV cache")
    p.add_argument("--verbose", action="store_true", help="also print the model used and the prompt's token count")
    p.add_argument("--version", action="version", version=f"apertus-mlx {__version__}")
    return p


def main(argv: list[str] | None = None, stdin: TextIO = sys.stdin) -> int:
    args = build_parser().parse_args(argv)
    engine, status = None, 1
    try:
        prompt = stdin.read() if args.prompt == "-" else args.prompt
        options = SamplingOptions(
            max_tokens=args.max_tokens,
            temperature=args.temp,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop=tuple(args.stop),
        )
        if not prompt.strip():
            raise ApertusError("empty prompt: pass --prompt TEXT (or --prompt - with text on stdin)")
        images = [image_url(path) for path in args.image]  # a bad path is refused before the model loads
        # Refused before the model loads, which takes seconds.
        check_cache_settings(bool(args.draft_model), args.num_draft_tokens, args.kv_bits, args.max_kv_size)
        engine = Engine(args.model, draft_model=args.draft_model)
        engine.wait_ready()
        if engine.note:
            print(engine.note, file=sys.stderr)
        for line in engine.import_summary:
            print(line, file=sys.stderr)
        if args.verbose:
            print(f"model: {engine.model_path}", file=sys.stderr)
        session = engine.session(
            system=args.system_prompt,
            think=args.think,
            options=options,
            num_draft_tokens=args.num_draft_tokens,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            max_kv_size=args.max_kv_size,
        )
        with closing(
            engine.stream(session, prompt, images=images or None)
        ) as events:  # closing the stream cancels the turn
            status = _print_turn(events, args.think)
    except ApertusError as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        status = 130
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, and keep the final flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        if engine is not None:
            _stop(engine, status)
    return status


def _stop(engine: Engine, status: int) -> None:
    """End the engine's MLX thread before the interpreter finalizes, on every path (mlx_thread.py says why).

    A cancelled turn stops after its current token, but a model load or a prefill chunk runs to its end;
    if that takes longer than `STOP_WAIT_S`, or on a second Ctrl-C, the process exits at once through
    `os._exit`, which skips finalization and so cannot abort inside MLX.
    """

    def quit_now(code: int) -> None:
        with suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: quit_now(130)) if in_main_thread else None
    try:
        if not engine.close(timeout=STOP_WAIT_S, cancel=True):
            quit_now(status)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


def _print_turn(events: Iterator[Event], show_reasoning: bool) -> int:
    out, err = sys.stdout, sys.stderr
    channel = "answer"
    for event in events:
        if isinstance(event, TextDelta):
            if event.channel != channel and show_reasoning:
                out.write("[reasoning]\n" if event.channel == "reasoning" else "\n[answer]\n")
            channel = event.channel
            if event.channel == "answer" or show_reasoning:
                out.write(event.text)
                out.flush()
        elif isinstance(event, ToolCall):
            out.write(f"\n[tool call] {event.name}({event.arguments})\n")
        elif isinstance(event, ToolCallError):
            err.write(f"\n[bad tool call] {event.message}\n")
        elif isinstance(event, Done):
            out.write("\n")
            s = event.stats
            err.write(
                f"prompt: {s.prompt_tokens} tokens, {s.prompt_tps:.1f} tok/s | "
                f"generation: {s.generated_tokens} tokens, {s.generation_tps:.1f} tok/s | "
                f"first token: {s.time_to_first_token:.2f} s | peak memory: {s.peak_memory_gb:.2f} GB"
                + (f" | draft accepted: {s.draft_accepted}" if s.draft_accepted is not None else "")
                + (f" | stopped: {event.finish_reason}" if event.finish_reason != "stop" else "")
                + "\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
