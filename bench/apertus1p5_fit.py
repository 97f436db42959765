"""What fits, computed (not measured): Apertus 1.5 8B/70B weights plus KV cache against 16/32/64 GB Macs.

    python -m bench.apertus1p5_fit     # prints the README's "Apertus 1.5" table

Shapes: the 8B as Apertus-8B's decoder, the 70B as Apertus-70B's, both with 1.5's 266,752-row embedding and
131,272-row (text) head. Quantized weights are affine g64 (bits + 0.5 per weight), embedding and head included.
A Mac fits when `apertus_mlx.model_info.fits_in_ram` says so (the rule of the `budget` recipe and the pickers).
"""

from __future__ import annotations

from apertus_mlx.model_info import fits_in_ram

INPUT_VOCAB, OUTPUT_VOCAB = 266_752, 131_272
SHAPES = {"8B": (4096, 32, 21504, 32, 8), "70B": (8192, 80, 43008, 64, 8)}  # hidden, layers, MLP, heads, KV heads
PRECISIONS = (("BF16", 16.0), ("8-bit", 8.5), ("4-bit", 4.5), ("3-bit", 3.5))  # bits per weight
RAM_GB = (16, 32, 64)  # GiB, as a Mac reports its memory
COLUMNS = (  # (heading, KV bits per value / 16, tokens)
    ("16-bit KV 8k (= rotating)", 1.0, 8192),
    ("16-bit 32k", 1.0, 32768),
    ("16-bit 128k", 1.0, 131072),
    ("`kv_bits=8` 32k", 8.5 / 16, 32768),
    ("`kv_bits=8` 128k", 8.5 / 16, 131072),
)


def parameters(hidden: int, layers: int, mlp: int, heads: int, kv_heads: int) -> int:
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    return layers * (attention + 2 * hidden * mlp) + (INPUT_VOCAB + OUTPUT_VOCAB) * hidden


def kv_bytes_per_token(hidden: int, layers: int, mlp: int, heads: int, kv_heads: int) -> int:
    return 2 * layers * kv_heads * (hidden // heads) * 2  # keys and values, 16 bits


def rows() -> list[str]:
    out = ["| model | weights | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---" * (2 + len(COLUMNS)) + "|"]
    for name, shape in SHAPES.items():
        n, per_token = parameters(*shape), kv_bytes_per_token(*shape)
        for label, bpw in PRECISIONS:
            weights = n * bpw / 8
            cells = [f"{name} {label}", f"{weights / 1e9:.1f}"]
            for _, share, tokens in COLUMNS:
                fit = next((r for r in RAM_GB if fits_in_ram(weights, per_token * share, r * 2**30, tokens)), None)
                total = weights + per_token * share * tokens
                cells.append(f"{total / 1e9:.1f} · {fit or '—'}")
            out.append("| " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    print("\n".join(rows()))
