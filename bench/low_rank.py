"""Does low-rank error compensation pay for its bytes? Rank-r corrections against wider widths, per byte.

    python -m bench.low_rank                      # the yardstick `small` model
    python -m bench.low_rank --model DIR --ranks 8 32

Rounds every decoder projection of a bf16 checkpoint to 3 bits in groups of 64, then compares what the
same extra bytes buy: a rank-r correction of the rounding error (its top singular vectors, in 16 bits),
groups of 32, or 4 bits in groups of 128. Prints the extra bits per weight and the error left, relative
to 3-bit g64 (squared Frobenius norm, averaged over projections). A correction pays only if it leaves
less error than a wider width for the same bits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlx.core as mx
import numpy as np

import apertus_mlx

SMALL = Path(__file__).resolve().parent / "yardstick" / "models" / "small"
BASE = (3, 64)


def _rounded(w: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    q = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    return np.array(mx.dequantize(*q, group_size=group_size, bits=bits))


def compare(model_dir: Path, ranks: tuple[int, ...]) -> list[tuple[str, float, float]]:
    """(what, extra bits per weight, error left relative to 3-bit g64), averaged over the decoder projections."""
    model = apertus_mlx.load_model(model_dir)
    results: dict[str, list[tuple[float, float]]] = {}
    for name, module in model.named_modules():
        if ".layers." not in name or not hasattr(module, "weight") or module.weight.ndim != 2:
            continue
        w = np.array(module.weight.astype(mx.float32))
        m, n = w.shape
        energy = (w * w).sum()
        base = _rounded(w, *BASE)
        residual = w - base
        base_error = (residual * residual).sum() / energy
        u, s, vt = np.linalg.svd(residual, full_matrices=False)
        for r in ranks:
            left = residual - (u[:, :r] * s[:r]) @ vt[:r]
            cost = r * (m + n) * 16 / (m * n)
            results.setdefault(f"rank-{r} correction", []).append((cost, (left * left).sum() / energy / base_error))
        for bits, group in ((3, 32), (4, 128)):
            diff = w - _rounded(w, bits, group)
            cost = bits + 32 / group - (BASE[0] + 32 / BASE[1])
            results.setdefault(f"{bits}-bit g{group}", []).append((cost, (diff * diff).sum() / energy / base_error))
    return [(what, float(np.mean([c for c, _ in v])), float(np.mean([e for _, e in v]))) for what, v in results.items()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.low_rank", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=SMALL, help="a bf16 checkpoint (default: yardstick small)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    args = ap.parse_args(argv)
    print(f"| on top of {BASE[0]}-bit g{BASE[1]} | extra bits per weight | error left |")
    print("|---|---:|---:|")
    for what, cost, left in compare(args.model, tuple(args.ranks)):
        print(f"| {what} | +{cost:.2f} | {left:.3f}x |")


if __name__ == "__main__":
    main()
