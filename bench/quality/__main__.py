"""Run every contender on one checkpoint and write the comparison (JSON, Markdown, PNG)."""

from __future__ import annotations

import argparse
import fnmatch
import json
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import mlx.core as mx
from tqdm import tqdm

from apertus_mlx.errors import ApertusError
from apertus_mlx.load import load_tokenizer, resolve
from quant_recipes.calibration import read_text, token_sequences

from . import report
from .contenders import MLX_LM, Contender, Data, all_contenders, matched_budgets
from .measure import measure, reference

COMPARABLE = (
    "model",
    "calibration_text",
    "eval_text",
    "eval_sequences",
    "sequence_length",
    "calibration_sequences",
    "calibration_length",
)


def run_contender(contender: Contender, source: Path, data: Data, ref, scratch: Path) -> dict[str, Any]:
    """Make one contender's checkpoint in `scratch`, time it, and measure it; a failure is recorded, not raised."""
    point: dict[str, Any] = {"name": contender.name, "family": contender.family}
    out = scratch / contender.name.replace("/", "__")
    try:
        start = time.perf_counter()
        contender.make(source, out, data)
        point["conversion_seconds"] = round(time.perf_counter() - start, 2)
        point.update(measure(out, ref))
        if (out / "quality.json").is_file():  # ours: which version of the recipe made this point
            point["recipe_hash"] = json.loads((out / "quality.json").read_text())["recipe_hash"]
    except Exception as error:  # one tool failing must not cost the other sixty points
        traceback.print_exc()
        point["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    finally:
        shutil.rmtree(out, ignore_errors=True)  # sixty-five 8B outputs would not fit on a disk
    mx.clear_cache()
    return point


def device_name() -> str:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    name = info.get("device_name") or info.get("architecture") or str(mx.default_device())
    return f"{name} ({platform.system()})"


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """`out` (Markdown page), and beside it the same stem as `.json` (all points) and `.png` (the plot)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    data, png = out.with_suffix(".json"), out.with_suffix(".png")
    _atomic_write(data, json.dumps(results, indent=2) + "\n")
    report.plot(results["points"], png, f"KL divergence vs size: {results['setup']['model_name']}")
    _atomic_write(out, report.page(results, png.name))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    ap.add_argument("--model", required=True, help="unquantized checkpoint (directory or hub id)")
    ap.add_argument("--calibration-text", type=Path, required=True, help="UTF-8 text to calibrate on")
    ap.add_argument("--eval-text", type=Path, required=True, help="held-out UTF-8 text to measure on")
    ap.add_argument("--out", type=Path, required=True, help="Markdown page to write; .json and .png go beside it")
    ap.add_argument("--only", nargs="+", metavar="GLOB", help="contender names to run, e.g. 'mlx-lm/rtn-4-*'")
    ap.add_argument(
        "--resume", action="store_true", help="keep the points already in the .json (failed ones too) and run the rest"
    )
    ap.add_argument("--list", action="store_true", help="print the contenders and exit")
    ap.add_argument("--eval-sequences", type=int, default=64)
    ap.add_argument("--sequence-length", type=int, default=512)
    ap.add_argument("--calibration-sequences", type=int, default=128, help="windows for mlx-lm's calibrated tools")
    ap.add_argument("--calibration-length", type=int, default=512)
    args = ap.parse_args(argv)

    def selected(contenders: list[Contender]) -> list[Contender]:
        globs = args.only or ["*"]
        return [c for c in contenders if any(fnmatch.fnmatchcase(c.name, g) for g in globs)]

    contenders = selected(all_contenders())
    matching = bool(selected(matched_budgets([4.0])))  # is our budget at mlx-lm's sizes asked for?
    if not contenders and not matching:
        ap.error(f"--only {' '.join(args.only)} matches no contender (see --list)")
    if args.list:
        print("\n".join(c.name for c in contenders))
        if matching:
            print("apertus-mlx/budget@<bpw>: at the size of each of mlx-lm's Pareto-optimal points, once measured")
        return

    def pending(points: list[dict[str, Any]]) -> list[Contender]:
        """What is still to run; our budget's sizes follow from mlx-lm's measured points."""
        done = {p["name"] for p in points}
        wanted = contenders + (selected(budget_matches(points)) if matching else [])
        return [c for c in wanted if c.name not in done]

    # Points are comparable only when measured on the same model, texts and windows.
    arguments = {k: str(getattr(args, k)) for k in COMPARABLE}
    points: list[dict[str, Any]] = []
    previous = args.out.with_suffix(".json")
    if args.resume and previous.is_file():
        earlier = json.loads(previous.read_text())
        if earlier["setup"].get("arguments") != arguments:
            ap.error(
                f"{previous} was measured with other settings ({earlier['setup'].get('arguments')}); drop --resume"
            )
        points = earlier["points"]
    # The command that makes these points from scratch (a resumed run only continues it).
    command = "python -m bench.quality " + shlex.join(a for a in argv if a != "--resume")
    if not pending(points):  # everything asked for is measured: only the page and plot are rewritten
        if not points:
            ap.error("nothing to run: our budget's sizes come from mlx-lm's points; measure those first")
        write_outputs({"setup": dict(earlier["setup"], command=command), "points": points}, args.out)
    else:
        try:
            points = run_all(pending, points, args, dict(command=command, arguments=arguments))
        except ApertusError as error:  # a missing model or text file: one line, not a traceback
            raise SystemExit(f"error: {error}") from None
    print(f"wrote {args.out}, {args.out.with_suffix('.json')}, {args.out.with_suffix('.png')}")


def budget_matches(points: list[dict[str, Any]]) -> list[Contender]:
    """Our budget recipe at the size of each of mlx-lm's Pareto-optimal points in the judged span."""
    theirs = report.frontier([p for p in points if p["family"] == MLX_LM])
    return matched_budgets(
        [p["bits_per_weight"] for p in theirs if report.RANGE[0] <= p["bits_per_weight"] <= report.RANGE[1]]
    )


def run_all(pending, points: list[dict[str, Any]], args, setup: dict[str, Any]) -> list[dict[str, Any]]:
    """Run what `pending(points)` asks for until nothing is left, rewriting the outputs after each point."""
    source = resolve(args.model)
    ref = reference(source, args.eval_text, args.eval_sequences, args.sequence_length)
    text = read_text(args.calibration_text)
    calibration = token_sequences(
        load_tokenizer(source), text, args.calibration_sequences, args.calibration_length, "calibration"
    )
    data = Data(args.calibration_text, args.eval_text, calibration)
    setup = {
        **setup,
        "model": str(args.model),
        "model_name": Path(str(args.model)).name,
        "parameters": ref.parameters,
        "evaluation_text": str(args.eval_text),
        "evaluation_sequences": int(ref.tokens.shape[0]),
        "sequence_length": int(ref.tokens.shape[1]),
        "evaluation_tokens": int(ref.tokens.shape[0] * (ref.tokens.shape[1] - 1)),
        "calibration_text": str(args.calibration_text),
        "calibration_sequences": int(calibration.shape[0]),
        "calibration_length": int(calibration.shape[1]),
        "versions": _versions(),
        "device": device_name(),
    }
    with tempfile.TemporaryDirectory(prefix="apertus-quality-") as scratch:
        # Two rounds at most: the fixed contenders, then our budget at the sizes their results call for.
        while todo := pending(points):
            bar = tqdm(todo, desc="contenders", unit="model")
            for contender in bar:
                bar.set_postfix_str(contender.name)
                point = run_contender(contender, source, data, ref, Path(scratch))
                points.append(point)
                shown = point.get("error") or f"{point['bits_per_weight']:.3f} bpw, KL {point['kl_divergence']:.4f}"
                tqdm.write(f"{contender.name}: {shown}")
                write_outputs({"setup": setup, "points": points}, args.out)
    return points


def _versions() -> str:
    import mlx_lm

    import apertus_mlx

    return f"apertus-mlx {apertus_mlx.__version__}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}"


if __name__ == "__main__":
    main()
