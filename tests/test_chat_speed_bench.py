"""`python -m bench.chat_speed --sessions`: concurrent sessions vs mlx-lm's BatchGenerator, end to end on CPU."""

import json
import math

from bench.chat_speed import main

from checkpoints import make_reference, save_reference, silence_special_tokens


def test_concurrent_sessions_report_rates_first_tokens_and_batched_vs_solo_agreement(tmp_path, capsys):
    checkpoint = save_reference(silence_special_tokens(make_reference(seed=7)), tmp_path / "ckpt")  # float32
    out = tmp_path / "speed.json"
    argv = ["--model", str(checkpoint), "--sessions", "1,2", "--no-single", "--repeats", "1"]
    argv += ["--session-prompt-tokens", "128", "--max-tokens", "6", "--busy-tokens", "12", "--out", str(out)]
    assert main(argv) == 0

    result = json.loads(out.read_text())["concurrency"]
    assert result["dtype"] == "float32" and result["quantization"] is None
    assert len(result["prompt_tokens"]) == 4 and set(result["prompt_tokens"]) == {128}  # 4: the first-token test
    assert set(result["decode"]) == {"1", "2"} and result["scaling_4_over_1"] is None
    for n, d in result["decode"].items():
        assert d["ours_tps"] > 0 and d["mlx_lm_tps"] > 0
        assert math.isclose(d["ours_over_mlx_lm"], d["ours_tps"] / d["mlx_lm_tps"])
        assert math.isclose(d["ours_over_ours_1"], d["ours_tps"] / result["decode"]["1"]["ours_tps"])
        for side in ("ours", "mlx-lm"):
            (run,) = d["runs"][side]  # one repeat (after the discarded warm-up)
            assert run["decode_tokens"] == int(n) * (6 - 1) and run["window_s"] > 0
            assert len(run["ttft_s"]) == int(n) and min(run["ttft_s"]) > 0
        assert d["agreement_with_solo"]["ours"]["identical_fraction"] == 1.0  # float32: batched == solo
        assert 0 <= d["agreement_with_solo"]["mlx-lm"]["identical_fraction"] <= 1

    ttft = result["ttft_under_load"]
    assert ttft["idle_s"] > 0 and ttft["busy_s"] > 0 and math.isclose(ttft["ratio"], ttft["busy_s"] / ttft["idle_s"])
    assert isinstance(ttft["others_still_decoding"], bool)

    agree = result["agreement"]
    assert agree["batch"] == 4 and agree["sequences"] == 4
    assert agree["identical_fraction"] == 1.0 and agree["mean_common_prefix"] == agree["mean_length"] == 6

    table = capsys.readouterr().out
    assert "| sessions | ours decode tok/s | mlx-lm BatchGenerator tok/s |" in table
    assert "while 3 decode / idle" in table and "batched (4) == solo" in table
