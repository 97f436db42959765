"""Peak memory of a conversion, against its bound: 1.5x the output's size plus one full-precision layer.

    python -m bench.convert_memory --shape 8b --recipe int4-g64   # random weights in the Apertus-8B shape

Writes a random bf16 checkpoint of the shape (memory does not depend on the values), converts it in a
fresh process, and prints the peak of MLX's allocations and of the process's resident memory next to the
bound. Resident memory also counts pages of the source file the OS has cached, which it can drop.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .shapes import SHAPES, random_model, save_layer_by_layer

GB = 1e9


def measure(source: Path, out: Path, recipe: str) -> dict:
    """Convert `source` by `recipe` into `out` in this process; its peak memory and time."""
    from quant_recipes.convert import convert, tqdm_progress
    from quant_recipes.recipe import load_recipe

    mx.reset_peak_memory()
    start = time.perf_counter()
    convert(source, load_recipe(recipe), out, progress=tqdm_progress, eval_sequences=2)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_mlx_bytes": mx.get_peak_memory(),
        "peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024,  # bytes on macOS, KiB on Linux
        "seconds": round(time.perf_counter() - start, 1),
    }


def run(shape: str, recipe: str, workdir: Path) -> dict:
    model, config = random_model(shape)
    layer_bytes = sum(a.nbytes for _, a in tree_flatten(model.layers[0].parameters()))  # bf16, shapes only
    source = save_layer_by_layer(model, config, workdir / "bf16")
    del model
    out = workdir / "out"
    # A fresh process, so the random model built above is not counted.
    child = [sys.executable, "-m", "bench.convert_memory", "--measure", str(source), str(out), recipe]
    done = subprocess.run(child, stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    output_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    source_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    bound = 1.5 * output_bytes + layer_bytes
    return {
        "shape": shape,
        "recipe": recipe,
        "source_bytes": source_bytes,
        "output_bytes": output_bytes,
        "layer_bytes": layer_bytes,
        "bound_bytes": bound,
        **result,
        "peak_mlx_over_bound": result["peak_mlx_bytes"] / bound,
        "device": str(mx.default_device()),
    }


def table(r: dict) -> str:
    rows = [
        ("source (bf16)", f"{r['source_bytes'] / GB:.2f} GB"),
        ("output", f"{r['output_bytes'] / GB:.2f} GB"),
        ("one bf16 decoder layer", f"{r['layer_bytes'] / GB:.2f} GB"),
        ("bound: 1.5 x output + one layer", f"{r['bound_bytes'] / GB:.2f} GB"),
        ("peak MLX memory", f"{r['peak_mlx_bytes'] / GB:.2f} GB ({r['peak_mlx_over_bound']:.2f} x bound)"),
        ("peak resident memory (incl. cached source pages)", f"{r['peak_rss_bytes'] / GB:.2f} GB"),
        ("conversion time", f"{r['seconds']:.0f} s"),
    ]
    head = f"| {r['shape']}, recipe `{r['recipe']}` on {r['device']} | |\n|---|---:|\n"
    return head + "\n".join(f"| {k} | {v} |" for k, v in rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.convert_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--recipe", default="int4-g64")
    ap.add_argument("--workdir", type=Path, help="where the checkpoints go (the 8B shape needs ~22 GB free)")
    ap.add_argument("--out", type=Path, help="also write the result as JSON here")
    ap.add_argument("--measure", nargs=3, metavar=("SOURCE", "OUT", "RECIPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        source, out, recipe = args.measure
        print(json.dumps(measure(Path(source), Path(out), recipe)))
        return
    with tempfile.TemporaryDirectory(prefix="apertus-memory-", dir=args.workdir) as workdir:
        result = run(args.shape, args.recipe, Path(workdir))
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
