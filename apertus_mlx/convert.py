"""`python -m apertus_mlx.convert`: quantize a full-precision Apertus checkpoint by a recipe."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from .errors import ApertusError
from .progress import LoadProgress


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m apertus_mlx.convert",
        description="Quantize BF16/FP16/FP32 Apertus weights by a recipe; writes MLX weights and a quality report.",
    )
    p.add_argument("--model", help="source: Hugging Face repo id or directory of full-precision safetensors")
    p.add_argument(
        "--recipe",
        help="a shipped recipe name (see --list-recipes) or a recipe .toml file; without one, a GGUF, GPTQ or "
        "NVFP4 source is saved as an MLX checkpoint as it is",
    )
    p.add_argument("--out", type=Path, help="output directory (created atomically)")
    p.add_argument("--calibration-text", type=Path, help="UTF-8 text for calibration (default: shipped multilingual)")
    p.add_argument("--eval-text", type=Path, help="UTF-8 held-out text for the quality report")
    p.add_argument("--eval-sequences", type=int, default=16, help="held-out sequences for the report (default 16)")
    target = p.add_argument_group("size target (budget recipes)", "aim a budget recipe at another size than its file")
    aim = target.add_mutually_exclusive_group()
    aim.add_argument("--bits-per-weight", type=float, metavar="BPW", help="average bits per weight, e.g. 3.3")
    aim.add_argument("--size-gb", type=float, metavar="GB", help="bytes of weights, in GB, e.g. 4.2")
    aim.add_argument("--ram-gb", type=float, metavar="GB", help="fit a Mac with this much memory, e.g. 16")
    target.add_argument("--context", type=int, metavar="TOKENS", help="with --ram-gb: context to leave room for")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--progress",
        choices=("bars", "json"),
        default="bars",
        help="bars on stderr (default), or JSON lines on stdout for another program to show",
    )
    p.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Imported here so `--help` stays instant.
    from quant_recipes.convert import convert, estimated_bpw, tqdm_progress
    from quant_recipes.recipe import load_recipe, shipped_recipes

    # A terminated conversion unwinds like Ctrl-C, so the partial output directory is removed.
    signal.signal(signal.SIGTERM, _interrupt)
    json_progress = JsonProgress(sys.stdout) if args.progress == "json" else None
    try:
        if args.list_recipes:
            recipes = shipped_recipes()
            width = max(len(r.name) for r in recipes)
            print(f"{'recipe':<{width}}  {'bpw (8B)':>8}  description")
            for r in recipes:
                bpw = estimated_bpw(r)
                print(f"{r.name:<{width}}  {f'{bpw:.2f}' if bpw else 'target':>8}  {r.description}")
            return 0
        missing = [f"--{k}" for k in ("model", "out") if getattr(args, k) is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
        if args.recipe is None:
            return save_import(args)
        recipe = load_recipe(args.recipe)
        aims = {k: getattr(args, k) for k in ("bits_per_weight", "size_gb", "ram_gb", "context")}
        if any(v is not None for v in aims.values()):
            recipe = recipe.with_target(**aims)
        report = convert(
            args.model,
            recipe,
            args.out,
            calibration_text=args.calibration_text,
            evaluation_text=args.eval_text,
            progress=json_progress.passes if json_progress else tqdm_progress,
            overwrite=args.overwrite,
            eval_sequences=args.eval_sequences,
            download_progress=json_progress.download if json_progress else None,
        )
        for warning in report["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        if json_progress:
            json_progress.done(args.out, report)
            return 0
        print(
            f"{args.out}: {report['bits_per_weight']:.3f} bits/weight, {report['size_bytes'] / 1e6:.1f} MB, "
            f"KL {report['kl_divergence']:.5f}, top-1 {100 * report['top1_agreement']:.1f}%, "
            f"perplexity {report['perplexity_original']:.2f} -> {report['perplexity_quantized']:.2f} "
            f"(details: {args.out / 'QUALITY.md'})"
        )
        return 0
    except (ApertusError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        return 130


def save_import(args: argparse.Namespace) -> int:
    """No recipe: a published GGUF / GPTQ / NVFP4 checkpoint saved as MLX as it is, for faster later loads."""
    from .formats import detect, save_as_mlx
    from .load import resolve

    source = resolve(args.model)
    if detect(source) is None:
        raise ApertusError(
            f"{args.model} is not a GGUF, GPTQ or NVFP4 checkpoint: pass --recipe to quantize it (see --list-recipes)"
        )
    out, summary = save_as_mlx(source, args.out, overwrite=args.overwrite)
    for line in summary.lines():
        print(line, file=sys.stderr)
    print(f"{out}: saved as an MLX checkpoint ({summary.weight_bytes / 1e6:.1f} MB of weights)")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class JsonProgress:
    """Progress as JSON lines, one object per update, at most a few per second per stage.

    `{"type": "progress", "stage", "done", "total", "unit", "description"}` for the download of the source
    and each pass of the conversion; the last update of every stage is always written. At the end,
    `{"type": "done", "out", "bits_per_weight", "size_bytes", ...}`.
    """

    def __init__(self, out: TextIO, interval: float = 0.25):
        self.out = out
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}  # (stage, description) -> when it was last written
        self._pending: dict[tuple[str, str], dict[str, Any]] = {}  # updates held back by the throttle

    def download(self, update: LoadProgress) -> None:
        """A `resolve(progress=…)` callback: the hub's download, one bar per quantity (files, bytes)."""
        total = update.total
        final = total is not None and update.done >= total
        self.update(update.stage, update.done, total, update.unit, update.description, final)

    def passes(self, iterable: Iterable[Any], description: str, total: int) -> Iterator[Any]:
        """The conversion's `progress` hook: one stage per pass over the layers."""
        self.update(description, 0, total, "layer", description, total == 0)
        for done, item in enumerate(iterable, 1):
            yield item
            self.update(description, done, total, "layer", description, done >= total)

    def update(self, stage: str, done: float, total: float | None, unit: str, description: str, final: bool) -> None:
        key = (stage, description)
        record = {
            "type": "progress",
            "stage": stage,
            "done": done,
            "total": total,
            "unit": unit,
            "description": description,
        }
        now = time.monotonic()
        if final or now - self._last.get(key, -1e9) >= self.interval:
            self._pending.pop(key, None)
            self._last[key] = now
            self._write(record)
        else:
            self._pending[key] = record

    def done(self, out: Path, report: dict[str, Any]) -> None:
        for record in self._pending.values():  # a stage that ended without reaching its total
            self._write(record)
        self._pending.clear()
        self._write(
            {
                "type": "done",
                "out": str(out),
                "bits_per_weight": report["bits_per_weight"],
                "size_bytes": report["size_bytes"],
                "kl_divergence": report["kl_divergence"],
                "top1_agreement": report["top1_agreement"],
                "warnings": report["warnings"],
            }
        )

    def _write(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()


if __name__ == "__main__":
    sys.exit(main())
