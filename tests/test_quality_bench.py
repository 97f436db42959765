"""The quality benchmark (`python -m bench.quality`): its KL arithmetic, its verdicts, and a run on nano."""

import json

import mlx.core as mx
import numpy as np
import pytest

import bench.quality.__main__ as quality_main
from apertus_mlx.load import DEMO_MODEL
from bench.quality.__main__ import budget_matches, main
from bench.quality.contenders import Contender, matched_budgets, ours
from bench.quality.report import frontier, verdicts
from quant_recipes.calibration import default_texts
from quant_recipes.pipeline import LogitComparison
from quant_recipes.recipe import load_recipe


def test_kl_top1_and_perplexity_match_numpy():
    rng = np.random.default_rng(0)
    p_logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    q_logits = p_logits + rng.normal(size=p_logits.shape).astype(np.float32)
    tokens = rng.integers(0, 11, size=(3, 7))
    comparison = LogitComparison()
    for i in range(3):  # batches accumulate
        comparison.update(mx.array(p_logits[i : i + 1]), mx.array(q_logits[i : i + 1]), mx.array(tokens[i : i + 1]))
    got = comparison.result()

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits)[:, :-1], log_softmax(q_logits)[:, :-1]
    targets = tokens[:, 1:, None]
    assert got["kl_divergence"] == pytest.approx((np.exp(lp) * (lp - lq)).sum(-1).mean(), rel=1e-5)
    assert got["top1_agreement"] == pytest.approx((lp.argmax(-1) == lq.argmax(-1)).mean())
    assert got["perplexity_original"] == pytest.approx(np.exp(-np.take_along_axis(lp, targets, -1).mean()), rel=1e-5)
    assert got["perplexity_quantized"] == pytest.approx(np.exp(-np.take_along_axis(lq, targets, -1).mean()), rel=1e-5)
    assert got["evaluation_tokens"] == 3 * 6


def _point(name, bpw, kl):
    family = name.split("/")[0]
    return {"name": name, "family": family, "bits_per_weight": bpw, "kl_divergence": kl}


def test_verdicts_compare_against_mlx_lm_frontier_at_equal_or_fewer_bits():
    points = [
        _point("mlx-lm/a", 3.0, 0.30),
        _point("mlx-lm/b", 3.5, 0.40),  # dominated by mlx-lm/a: not on their frontier, not judged
        _point("mlx-lm/c", 4.5, 0.05),
        _point("mlx-lm/d", 8.5, 0.001),  # outside the judged range
        _point("apertus-mlx/x", 2.9, 0.20),
        _point("apertus-mlx/y", 4.6, 0.01),  # better, but bigger than mlx-lm/c
        {"name": "apertus-mlx/broken", "family": "apertus-mlx", "error": "ValueError: boom"},
    ]
    assert [p["name"] for p in frontier(points)] == ["apertus-mlx/x", "mlx-lm/c", "apertus-mlx/y", "mlx-lm/d"]
    rows = verdicts(points)
    assert [(r["mlx_lm"]["name"], r["ours"]["name"], r["ours_wins"]) for r in rows] == [
        ("mlx-lm/a", "apertus-mlx/x", True),
        ("mlx-lm/c", "apertus-mlx/x", False),
    ]


def test_our_budget_is_run_at_the_size_of_each_mlx_lm_frontier_point():
    points = [
        _point("mlx-lm/a", 2.958, 0.60),
        _point("mlx-lm/b", 3.254, 0.38),
        _point("mlx-lm/c", 3.504, 0.50),  # dominated: no budget point for it
        _point("mlx-lm/d", 8.502, 0.001),  # outside the judged range
        _point("apertus-mlx/x", 3.0, 0.1),  # ours do not set the sizes
        {"name": "mlx-lm/broken", "family": "mlx-lm", "error": "ValueError: boom"},
    ]
    # Rounded down, so ours is never the bigger of the two.
    assert [c.name for c in budget_matches(points)] == ["apertus-mlx/budget@2.95bpw", "apertus-mlx/budget@3.25bpw"]


def test_harness_runs_end_to_end_on_nano(tmp_path, monkeypatch):
    calibration, evaluation = tmp_path / "calibration.txt", tmp_path / "evaluation.txt"
    for path, text in zip((calibration, evaluation), default_texts(), strict=True):
        path.write_text(text, encoding="utf-8")
    out = tmp_path / "report" / "quality.md"
    only = ["apertus-mlx/int2-g64", "apertus-mlx/int4-g64", "mlx-lm/rtn-4-g64", "mlx-lm/mixed_3_6"]
    args = ["--model", str(DEMO_MODEL), "--calibration-text", str(calibration), "--eval-text", str(evaluation)]
    args += ["--out", str(out), "--eval-sequences", "2", "--sequence-length", "128", "--calibration-sequences", "2"]
    main([*args, "--only", *only])

    results = json.loads(out.with_suffix(".json").read_text())
    points = {p["name"]: p for p in results["points"]}
    assert sorted(points) == sorted(only)
    assert all("error" not in p for p in points.values()), points
    # Our uniform recipe is plain round-to-nearest, as mlx-lm's convert: one evaluator must give them one number.
    assert points["apertus-mlx/int4-g64"]["kl_divergence"] == pytest.approx(points["mlx-lm/rtn-4-g64"]["kl_divergence"])
    assert points["apertus-mlx/int4-g64"]["bits_per_weight"] == pytest.approx(4.5, abs=0.05)
    assert points["apertus-mlx/int2-g64"]["kl_divergence"] > 5 * points["apertus-mlx/int4-g64"]["kl_divergence"]
    assert results["setup"]["evaluation_tokens"] == 2 * 127
    assert points["apertus-mlx/int4-g64"]["recipe_hash"] == load_recipe("int4-g64").content_hash

    page = out.read_text()
    assert "## Verdict" in page and "![KL divergence against bits per weight](quality.png)" in page
    assert all(f"`{name}`" in page for name in only)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --resume keeps what was measured and runs only what is missing.
    main([*args, "--only", *only, "mlx-lm/rtn-2-g64", "--resume"])
    again = json.loads(out.with_suffix(".json").read_text())["points"]
    assert [p["name"] for p in again][:4] == [p["name"] for p in results["points"]]
    assert again[-1]["name"] == "mlx-lm/rtn-2-g64" and len(again) == 5

    # Then our budget runs at the size of each of mlx-lm's best points (made here by a quick stand-in recipe).
    wanted = [c.name for c in budget_matches(again)]
    quick = ours("int4-g64").make
    stand_in = lambda sizes: [Contender(c.name, c.family, quick) for c in matched_budgets(sizes)]  # noqa: E731
    monkeypatch.setattr(quality_main, "matched_budgets", stand_in)
    main([*args, "--only", *only, "mlx-lm/rtn-2-g64", "apertus-mlx/budget@*", "--resume"])
    final = json.loads(out.with_suffix(".json").read_text())["points"]
    assert wanted and [p["name"] for p in final[5:]] == wanted
    assert all("error" not in p for p in final[5:]) and all(f"`{name}`" in out.read_text() for name in wanted)


def test_a_missing_text_file_is_one_line_naming_it(tmp_path):
    args = ["--model", str(DEMO_MODEL), "--calibration-text", str(tmp_path / "none.txt")]
    args += ["--eval-text", str(tmp_path / "none.txt"), "--out", str(tmp_path / "q.md"), "--only", "mlx-lm/rtn-4-g64"]
    with pytest.raises(SystemExit, match=r"^error: text file .*none.txt does not exist$"):
        main(args)
    assert not (tmp_path / "q.md").exists()
