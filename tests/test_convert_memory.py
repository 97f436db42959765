"""`python -m bench.convert_memory`: the conversion's peak memory set against its bound, on a tiny random shape."""

import json

from bench.convert_memory import main
from bench.shapes import SHAPES


def test_memory_bench_converts_a_random_shape_and_reports_against_the_bound(tmp_path):
    main(["--shape", "tiny", "--recipe", "int4-g64", "--workdir", str(tmp_path), "--out", str(tmp_path / "m.json")])
    r = json.loads((tmp_path / "m.json").read_text())
    hidden, _, mlp, heads, kv_heads, _, _ = SHAPES["tiny"]
    head_dim = hidden // heads
    projections = hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim) + 2 * hidden * mlp
    assert projections * 2 < r["layer_bytes"] < projections * 2 * 1.05  # bf16 weights, plus norms and xIELU
    # 4 bits and a scale and bias per 64 weights: about 4.5/16 of the bf16 source.
    assert 0.25 < r["output_bytes"] / r["source_bytes"] < 0.33
    assert r["bound_bytes"] == 1.5 * r["output_bytes"] + r["layer_bytes"]
    assert r["peak_mlx_bytes"] > r["layer_bytes"] and r["peak_rss_bytes"] > r["peak_mlx_bytes"]
    assert r["peak_mlx_over_bound"] == r["peak_mlx_bytes"] / r["bound_bytes"]
    assert list(tmp_path.iterdir()) == [tmp_path / "m.json"]  # the checkpoints are removed
