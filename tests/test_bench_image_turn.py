"""`python -m bench.image_turn` on its tiny shape: a random full Apertus 1.5 checkpoint whose image turn reads the
image's codes, and the numbers it reports."""

from __future__ import annotations

import json

from bench import image_turn


def test_the_image_turn_bench_runs_on_the_tiny_shape(tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = ["--repeats", "1", "--prompt-tokens", "32", "--gen-tokens", "3", "--image-size", "128", "--out", str(out)]
    assert image_turn.main(argv) == 0
    result = json.loads(out.read_text())
    text, image = result["summary"]["text"], result["summary"]["image"]
    # 128 x 128 pixels: an 8 x 8 grid of codes, plus the markers, the size ("8*8") and 7 row ends.
    assert 64 + 7 + 3 < image["prompt_tokens"] - text["prompt_tokens"] < 64 + 7 + 12
    assert text["encode_s"] == 0 < image["encode_s"] < image["ttft_s"]
    assert text["generated_tokens"] == image["generated_tokens"] == 3
    assert "| image encoding (s) |" in capsys.readouterr().out
