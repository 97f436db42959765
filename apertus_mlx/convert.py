"""`python -m apertus_mlx.convert`: quantize a full-precision Apertus checkpoint by a recipe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ApertusError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m apertus_mlx.convert",
        description="Quantize BF16/FP16/FP32 Apertus weights by a recipe; writes MLX weights and a quality report.",
    )
    p.add_argument("--model", help="source: Hugging Face repo id or directory of full-precision safetensors")
    p.add_argument("--recipe", help="a shipped recipe name (see --list-recipes) or a recipe .toml file")
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
    p.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Imported here so `--help` stays instant.
    from quant_recipes.convert import convert, estimated_bpw, tqdm_progress
    from quant_recipes.recipe import load_recipe, shipped_recipes

    try:
        if args.list_recipes:
            recipes = shipped_recipes()
            width = max(len(r.name) for r in recipes)
            print(f"{'recipe':<{width}}  {'bpw (8B)':>8}  description")
            for r in recipes:
                bpw = estimated_bpw(r)
                print(f"{r.name:<{width}}  {f'{bpw:.2f}' if bpw else 'target':>8}  {r.description}")
            return 0
        missing = [f"--{k}" for k in ("model", "recipe", "out") if getattr(args, k) is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
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
            progress=tqdm_progress,
            overwrite=args.overwrite,
            eval_sequences=args.eval_sequences,
        )
        for warning in report["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
