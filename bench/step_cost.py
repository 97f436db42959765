"""Host time to build one decode step's graph: the plain forward vs the compiled decode step, same weights.

    python -m bench.step_cost --shapes 0.5b --precisions bf16 int4

Decode at the sizes people run is bound by per-operation overhead. Part of it is the device's (one kernel per
operation), part the host's: Python building the step's graph before the device can start it. This measures the
host's part alone: `model(token, cache)` without evaluating it, then one evaluation, over and over at the same
position (the cache is trimmed back), median of `--steps`. It uses no device time to speak of, so it is steady
even on a busy machine, and it is the part a fast GPU (Apple's) cannot hide. Prints a table; `--out FILE` writes
the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from .shapes import SHAPES, random_model
from .speed import PRECISIONS, quantize


def build_ms(model: Any, compiled: bool, steps: int, context: int = 16) -> float:
    """Median milliseconds to build (not run) one decode step's graph, `context` tokens into a chat."""
    model.compiled_decode = compiled
    cache = model.make_cache()
    mx.eval(model(mx.array([list(range(1, context + 1))]), cache=cache))
    token, times = mx.array([[5]]), []
    for _ in range(steps + 1):  # the first call traces the compiled step and is not counted
        start = time.perf_counter()
        logits = model(token, cache=cache)
        times.append(time.perf_counter() - start)
        mx.eval(logits)
        for layer_cache in cache:
            layer_cache.trim(1)
    model.compiled_decode = True
    return 1e3 * statistics.median(times[1:])


def measure(shape: str, precision: str, steps: int) -> dict[str, Any]:
    model, _ = random_model(shape)
    quantize(model, precision)
    mx.eval(model.parameters())
    plain, compiled = build_ms(model, False, steps), build_ms(model, True, steps)
    return {"name": f"{shape} {precision}", "layers": len(model.layers), "plain_ms": plain, "compiled_ms": compiled}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["0.5b"], choices=sorted(SHAPES))
    p.add_argument("--precisions", nargs="+", default=["bf16", "int4"], choices=PRECISIONS)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", type=Path, help="write the rows as JSON")
    args = p.parse_args(argv)

    lines = ["| model | layers | plain forward ms | compiled step ms | plain / compiled |", "|---|---:|---:|---:|---:|"]
    rows = []
    for shape in args.shapes:
        for precision in args.precisions:
            print(f"{shape} {precision}: building random weights", file=sys.stderr, flush=True)
            r = measure(shape, precision, args.steps)
            rows.append(r)
            times = f"{r['plain_ms']:.2f} | {r['compiled_ms']:.2f} | {r['plain_ms'] / r['compiled_ms']:.2f}x"
            lines.append(f"| {r['name']} | {r['layers']} | {times} |")
    print(f"graph building per decode step on {mx.default_device()} (MLX {mx.__version__}), median of {args.steps}\n")
    print("\n".join(lines))
    if args.out:
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps({"mlx": mx.__version__, "device": str(mx.default_device()), "rows": rows}) + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
