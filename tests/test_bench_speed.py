"""`python -m bench.speed`: ours vs mlx-lm on the same files, per precision; table, JSON and chart."""

import json
import math
import statistics

from mlx.utils import tree_flatten

from apertus_mlx.model import Model, ModelArgs
from bench.shapes import shape_config
from bench.speed import main, quantize, weight_bytes_per_token
from bench.step_cost import main as step_cost


def test_speed_table_json_and_chart_on_the_tiny_shape(tmp_path, capsys):
    out = tmp_path / "speed-0.5x"  # a dotted prefix is a prefix, not a name with a suffix
    argv = ["--shapes", "tiny", "--precisions", "bf16", "mix", "--prompt-tokens", "48", "--gen-tokens", "8"]
    argv += ["--repeats", "2", "--turns", "2", "--turn-tokens", "16", "--out", str(out)]
    assert main(argv) == 0

    data = json.loads(out.with_name(out.name + ".json").read_text())
    assert [r["name"] for r in data["rows"]] == ["tiny bf16", "tiny mix"]
    for row in data["rows"]:
        raw = data["raw"][row["name"]]
        assert raw["ours"]["generation_tps"] > 0 and raw["mlx-lm"]["generation_tps"] > 0
        rounds = raw["rounds"]
        assert all(len(rates) == 2 for rates in rounds.values())  # the warm-up round is not counted
        assert raw["ours"]["generation_tps"] == statistics.median(rounds["ours"])
        ratios = sorted(o / t for o, t in zip(rounds["ours"], rounds["mlx-lm"], strict=True))
        assert math.isclose(row["decode_ratio"], (ratios[0] + ratios[1]) / 2)
        gains = sorted(o / p for o, p in zip(rounds["ours"], rounds["plain"], strict=True))
        assert math.isclose(row["compiled_gain"], (gains[0] + gains[1]) / 2)
        assert len(raw["ttft_turns"]) == 2
        assert math.isclose(row["turn_ttft_ratio"], raw["ttft_turns"][1] / raw["ttft_turns"][0])
    page = out.with_name(out.name + ".md").read_text()
    assert "| tiny bf16 |" in page and "| tiny mix |" in page and page in capsys.readouterr().out + "\n"
    assert out.with_name(out.name + ".png").read_bytes()[:4] == b"\x89PNG"


def test_mix_widths_and_roofline_bytes():
    config = shape_config("tiny")
    config["num_hidden_layers"] = 3
    model = Model(ModelArgs.from_config(config))
    embedding = model.model.embed_tokens.weight.nbytes
    total = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    assert weight_bytes_per_token(model) == total - embedding  # untied: one embedding row per token, not the table
    quantize(model, "mix")
    first, middle, last = model.layers
    assert (first.mlp.up_proj.bits, last.self_attn.q_proj.bits) == (6, 6)
    assert (middle.self_attn.o_proj.bits, middle.mlp.down_proj.bits) == (4, 3)
    assert model.model.embed_tokens.bits == 6 and model.lm_head.bits == 6


def test_step_cost_times_both_paths_on_the_tiny_shape(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert step_cost(["--shapes", "tiny", "--precisions", "bf16", "int4", "--steps", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["tiny bf16", "tiny int4"]
    printed = capsys.readouterr().out
    for r in rows:
        assert r["plain_ms"] > 0 and r["compiled_ms"] > 0 and r["layers"] == shape_config("tiny")["num_hidden_layers"]
        assert f"| {r['name']} | {r['layers']} | {r['plain_ms']:.2f} | {r['compiled_ms']:.2f} |" in printed
