"""`python -m bench.formats`: every contender loads as a user's would and is measured against its source."""

import json
import types
from pathlib import Path

import bench.formats.__main__ as formats_bench
from apertus_mlx.load import DEMO_MODEL

DEMO_GGUF = Path(__file__).resolve().parent / "fixtures" / "demo-bf16.gguf"


def test_a_bit_exact_import_measures_zero_divergence_and_failures_are_recorded(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(DEMO_GGUF.read_bytes()[:4096])  # truncated
    fake = types.SimpleNamespace(contenders=lambda source, scratch: [("demo BF16", DEMO_GGUF), ("cut", broken)])

    def tool_fails(source, scratch):
        raise RuntimeError("GPTQModel exited with status 1\ntraceback ...")

    monkeypatch.setattr(formats_bench, "FORMATS", {"gguf": fake, "gptq": types.SimpleNamespace(contenders=tool_fails)})
    out = tmp_path / "formats.md"
    argv = ["--model", str(DEMO_MODEL), "--eval-sequences", "2", "--sequence-length", "64", "--out", str(out)]
    formats_bench.main(argv)

    points = json.loads(out.with_suffix(".json").read_text())["points"]
    exact, cut, failed = points
    assert exact["name"] == "demo BF16" and exact["kl_divergence"] == 0.0 and exact["top1_agreement"] == 1.0
    assert exact["size_bytes"] == DEMO_GGUF.stat().st_size
    assert cut["error"].startswith("broken.gguf: truncated or not a GGUF file")
    assert failed["name"] == "gptq (making its checkpoints)" and failed["error"] == "GPTQModel exited with status 1"
    page = out.read_text()
    assert "| demo BF16 | 16.00 | 0.0000 | 1.000 |" in page and "| cut | — | — | — | failed: broken.gguf" in page
    assert page in capsys.readouterr().out
