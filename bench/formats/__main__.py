"""Quality of each published format as we import it: KL divergence against the BF16 source, one evaluator for all.

    python -m bench.formats                      # the yardstick `small` model, every format's contenders
    python -m bench.formats --formats gguf gptq --out docs/formats.md

Each format module (`bench/formats/{gguf,gptq,nvfp4}.py`) writes checkpoints of the source in its published
layout, with the format's own tool where that tool installs here, and names them. Every checkpoint is then
loaded by `apertus_mlx.load_model` exactly as a user's would be and measured by `bench.quality.measure`
against the source: bits per weight, KL divergence, top-1 agreement, perplexity. Writes `--out` (Markdown)
and the same numbers as JSON beside it, atomically.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.quality.measure import measure, reference
from quant_recipes.calibration import default_texts

from . import gguf, gptq, nvfp4

SMALL = Path(__file__).resolve().parents[1] / "yardstick" / "models" / "small"
FORMATS = {"gguf": gguf, "gptq": gptq, "nvfp4": nvfp4}


def run(
    source: Path, eval_text: Path | None, sequences: int, length: int, families: list[str], only: list[str]
) -> list[dict[str, Any]]:
    """Make every selected contender and measure it; a contender that fails is recorded with its error."""
    points = []
    with tempfile.TemporaryDirectory(prefix="formats-") as tmp:
        if eval_text is None:  # the held-out half of the text our recipes ship with (never their calibration half)
            eval_text = Path(tmp) / "evaluation.txt"
            eval_text.write_text(default_texts()[1], encoding="utf-8")
        ref = reference(source, eval_text, sequences, length)
        for family in families:
            module = FORMATS[family]
            scratch = Path(tmp) / family
            scratch.mkdir()
            print(f"{family}: writing its checkpoints", file=sys.stderr, flush=True)
            try:
                made = module.contenders(source, scratch)
            except Exception as e:  # a tool that fails to make its files must not lose the other formats' numbers
                points.append({"name": f"{family} (making its checkpoints)", "family": family, "error": _line(e)})
                continue
            for label, path in tqdm(made, desc=family, unit="checkpoint", file=sys.stderr):
                if not any(fnmatch.fnmatchcase(label, g) for g in only):
                    continue
                t0 = time.monotonic()
                try:
                    point = {"name": label, "family": family, **measure(path, ref)}
                except Exception as e:  # one broken contender must not hide the others' numbers
                    point = {"name": label, "family": family, "error": _line(e)}
                if path.is_file():  # a lone GGUF file: its own size, not a directory's safetensors
                    point["size_bytes"] = path.stat().st_size
                point["seconds"] = round(time.monotonic() - t0, 1)
                points.append(point)
    return points


def _line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def markdown(points: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    lines = [
        "# Imported formats: quality against the BF16 source",
        "",
        f"`{setup['command']}` on {setup['model']}: {setup['eval_sequences']} held-out windows of "
        f"{setup['sequence_length']} tokens. KL: mean per-token KL divergence of the import from the source.",
        "",
        "| checkpoint | bits per weight | KL | top-1 agreement | perplexity (source → import) |",
        "|---|---:|---:|---:|---|",
    ]
    for p in points:
        if "error" in p:
            lines.append(f"| {p['name']} | — | — | — | failed: {p['error']} |")
            continue
        lines.append(
            f"| {p['name']} | {p['bits_per_weight']:.2f} | {p['kl_divergence']:.4f} | {p['top1_agreement']:.3f} | "
            f"{p['perplexity_original']:.2f} → {p['perplexity_quantized']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.formats", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SMALL, help="BF16 source checkpoint (default: yardstick small)")
    ap.add_argument("--eval-text", type=Path, help="held-out UTF-8 text (default: the recipes' held-out half)")
    ap.add_argument("--eval-sequences", type=int, default=16)
    ap.add_argument("--sequence-length", type=int, default=256)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS), help="families to make")
    ap.add_argument("--only", nargs="+", default=["*"], metavar="GLOB", help="contender names to measure")
    ap.add_argument("--out", type=Path, help="Markdown page to write; the .json goes beside it")
    args = ap.parse_args(argv)
    command = "python -m bench.formats " + " ".join(argv if argv is not None else sys.argv[1:])
    points = run(args.model, args.eval_text, args.eval_sequences, args.sequence_length, args.formats, args.only)
    setup = {
        "command": command.strip(),
        "model": str(args.model),
        "eval_sequences": args.eval_sequences,
        "sequence_length": args.sequence_length,
    }
    page = markdown(points, setup)
    print(page)
    if args.out:
        _atomic_write(args.out, page)
        _atomic_write(args.out.with_suffix(".json"), json.dumps({"setup": setup, "points": points}, indent=2) + "\n")


if __name__ == "__main__":
    main()
