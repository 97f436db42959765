"""`python -m bench.serve_load`: the server started in a child process, loaded sequentially and concurrently."""

import json

from apertus_mlx.load import DEMO_MODEL
from bench.serve_load import main, percentile


def test_every_phase_is_reported_without_errors_and_with_the_servers_memory(tmp_path, capsys):
    out = tmp_path / "load.json"
    argv = ["--model", str(DEMO_MODEL), "--requests", "6", "--clients", "1,2", "--max-tokens", "4"]
    assert main([*argv, "--max-rss-growth-mb", "1024", "--out", str(out)]) == 0

    result = json.loads(out.read_text())
    assert result["passed"] and result["failures"] == [] and result["model"] == "demo model"
    names = ["warm-up, sequential", "warm-up, 2 concurrent", "sequential", "2 concurrent"]
    assert [p["phase"] for p in result["phases"]] == names
    assert [p["warmup"] for p in result["phases"]] == [True, True, False, False]
    for phase, clients in zip(result["phases"], (1, 2, 1, 2), strict=True):
        assert phase["clients"] == clients and phase["requests"] == phase["ok"] == 6
        assert phase["errors"] == 0 and phase["errors_by_kind"] == {} and phase["active_after"] == 0
        assert 0 < phase["completion_tokens"] <= 6 * 4 and phase["tokens_per_s"] > 0
        lat, ttft = phase["latency_s"], phase["ttft_s"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] < 30
        if ttft["p50"] is not None:  # a request that ends at once has no first text chunk
            assert 0 < ttft["p50"] <= ttft["p90"] <= lat["p99"]
        assert phase["memory_before"]["rss_mb"] > 0 and phase["memory_after"]["rss_mb"] > 0
    memory = result["memory"]
    assert memory["source"] in ("psutil", "/proc/PID/status", "ps")
    assert memory["rss_after_warmup_mb"] == result["phases"][1]["memory_after"]["rss_mb"] > 0
    assert memory["rss_growth_mb"] == memory["rss_final_mb"] - memory["rss_after_warmup_mb"]
    assert result["settings"]["max_tokens"] == 4 and len(result["settings"]["prompts"]) >= 4

    table = capsys.readouterr().out
    assert "| phase | clients | requests | errors | latency p50 / p90 / p99 (s) | TTFT p50 / p90 (s) |" in table
    assert "| sequential | 1 | 6 | 0 |" in table and "| 2 concurrent | 2 | 6 | 0 |" in table
    assert "Result: passed." in table


def test_a_memory_limit_the_run_exceeds_fails_it(tmp_path):
    argv = ["--model", str(DEMO_MODEL), "--requests", "2", "--clients", "1", "--max-tokens", "2"]
    assert main([*argv, "--max-rss-growth-mb", "-1000000", "--out", str(tmp_path / "load.json")]) == 1
    result = json.loads((tmp_path / "load.json").read_text())
    assert not result["passed"] and "RSS grew" in result["failures"][0]


def test_percentiles_interpolate_between_ranks():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 90) == 90.0
