"""Each published format through the faces: the CLI's import summary and answer, the model's description, saving
as MLX with `convert`, and picking one GGUF file of a hub repo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
import torch
from gguf import GGMLQuantizationType as T

from apertus_mlx import formats
from apertus_mlx.convert import main as convert_main
from apertus_mlx.errors import ModelNotFoundError
from apertus_mlx.formats import gguf
from apertus_mlx.hub import _gguf_choice
from apertus_mlx.load import DEMO_MODEL, load_model, load_tokenizer, make_cache
from apertus_mlx.lowrank import CastQuantizedLinear
from apertus_mlx.model_info import describe_model

from checkpoints import LINEARS, REPO, make_reference, save_reference, save_tokenizer, silence_special_tokens
from gguf_fixtures import write_model
from gptq_fixtures import Plan, write_gptq
from nvfp4_fixtures import write_modelopt

DEMO_GGUF = Path(__file__).resolve().parent / "fixtures" / "demo-bf16.gguf"  # llama.cpp's own conversion
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """{format: path}: the demo model's GGUF, and GPTQ (+ EoRA) and NVFP4 checkpoints of a tiny random model."""
    root = tmp_path_factory.mktemp("formats")
    source = save_reference(silence_special_tokens(make_reference(seed=5)), root / "float")
    modules = {f"model.layers.{i}.{name}": (4, 32, True) for i in range(2) for name in LINEARS}
    write_gptq(source, root / "gptq", Plan(group=32, modules=modules, ranks=dict.fromkeys(modules, 4), adapters="peft"))
    write_modelopt(source, root / "nvfp4")
    return {"gguf": DEMO_GGUF, "gptq": root / "gptq", "nvfp4": root / "nvfp4"}


def test_the_cli_prints_the_import_summary_and_answers_as_the_source_does():
    def answer(model: Path) -> subprocess.CompletedProcess:
        argv = ["-m", "apertus_mlx.generate", "--model", str(model), "--prompt", "Grüezi! Wie geht es?"]
        argv += ["--max-tokens", "12", "--temp", "0"]
        return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=180)

    gguf, source = answer(DEMO_GGUF), answer(DEMO_MODEL)
    assert gguf.returncode == 0, gguf.stderr
    summary = gguf.stderr.splitlines()[0]
    assert summary.startswith("GGUF BF16: ") and "bits per weight" in summary
    assert "GGUF" not in source.stderr
    # llama.cpp's BF16 conversion loads to the source's logits bit for bit: the same greedy answer.
    assert gguf.stdout.strip() and gguf.stdout == source.stdout


def test_each_format_is_described_before_loading(published):
    expected = {"gguf": "GGUF BF16", "gptq": "GPTQ INT4 g32", "nvfp4": "NVFP4"}
    for fmt, path in published.items():
        info = describe_model(path)
        assert info.quantization == expected[fmt]
        weights = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))
        assert info.weights_bytes == weights > 0
        assert info.kv_bytes_per_token > 0 and info.context_length > 0


def test_convert_without_a_recipe_saves_each_format_as_mlx(published, tmp_path, capsys):
    ids = mx.array([[1, 7, 42, 99, 5]])
    for fmt, path in published.items():
        out = tmp_path / fmt
        assert convert_main(["--model", str(path), "--out", str(out)]) == 0
        captured = capsys.readouterr()
        assert captured.err.splitlines()[0].startswith(("GGUF", "GPTQ", "NVFP4")), captured.err
        assert f"{out}: saved as an MLX checkpoint" in captured.out
        assert formats.detect(out) is None  # an ordinary MLX checkpoint now
        imported, saved = load_model(path), load_model(out)
        assert mx.array_equal(saved(ids), imported(ids)).item(), fmt
        text = "Hello Apertus, grüezi mitenand!"
        assert load_tokenizer(out).encode(text) == load_tokenizer(path).encode(text)


def test_a_recipe_on_an_imported_format_is_refused(published, tmp_path, capsys):
    assert convert_main(["--model", str(published["gptq"]), "--recipe", "int4-g64", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "is already quantized (GPTQ)" in err and "\n" not in err
    assert convert_main(["--model", str(DEMO_MODEL), "--out", str(tmp_path / "y")]) == 1
    assert "is not a GGUF, GPTQ or NVFP4 checkpoint: pass --recipe" in capsys.readouterr().err


def _resolve_offline(name: str, hf_home: Path) -> subprocess.CompletedProcess:
    code = "import apertus_mlx, sys\ntry: print(apertus_mlx.resolve(sys.argv[1]))\n"
    code += "except Exception as e: sys.exit(str(e))"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, name], env=env, capture_output=True, text=True, timeout=120)


def _cached_repo(hf_home: Path, repo: str, files: list[str]) -> Path:
    """A hub cache entry holding `files` (each the demo GGUF)."""
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).symlink_to(DEMO_GGUF)  # the hub's snapshots are links to blobs too
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_a_hub_repo_of_gguf_files_is_picked_by_tag(tmp_path):
    snapshot = _cached_repo(tmp_path, "someone/Apertus-GGUF", ["Apertus-Q4_K_M.gguf", "Apertus-Q8_0.gguf"])
    picked = _resolve_offline("someone/Apertus-GGUF:q8_0", tmp_path)
    assert picked.returncode == 0, picked.stderr
    assert picked.stdout.strip() == str(snapshot / "Apertus-Q8_0.gguf")
    several = _resolve_offline("someone/Apertus-GGUF", tmp_path)
    assert several.stderr.strip() == "2 GGUF files; pick one with repo:TAG, tags here: Q4_K_M, Q8_0"
    missing = _resolve_offline("someone/Apertus-GGUF:Q2_K", tmp_path)
    assert missing.stderr.strip() == "no GGUF file for :Q2_K; pick one with repo:TAG, tags here: Q4_K_M, Q8_0"

    single = _cached_repo(tmp_path, "someone/One-GGUF", ["One-BF16.gguf"])
    assert _resolve_offline("someone/One-GGUF", tmp_path).stdout.strip() == str(single / "One-BF16.gguf")


def test_a_tag_on_a_safetensors_repo_is_refused_and_a_safetensors_repo_needs_no_choice():
    with pytest.raises(ModelNotFoundError, match=r"^the tag :Q4_K_M picks a GGUF file, but the repo holds none$"):
        _gguf_choice(["model.safetensors", "config.json"], "Q4_K_M")
    assert _gguf_choice(["model.safetensors", "config.json", "extra/model-Q4_0.gguf"], "") is None


def test_a_quantized_gguf_of_a_bf16_model_computes_and_caches_in_bf16(tmp_path):
    """Exact fp32 K-quant scales must not lift activations and the KV cache to float32 (twice the memory)."""
    save_tokenizer(tmp_path / "tok")
    source = make_reference(hidden=256, intermediate=512).to(torch.bfloat16).to(torch.float32)  # bf16 values
    model, _ = gguf.load_model(write_model(source, tmp_path / "q4k.gguf", T.Q4_K, tmp_path / "tok"))
    projection = model.layers[0].self_attn.q_proj
    assert isinstance(projection, CastQuantizedLinear) and projection.scales.dtype == mx.float32  # exact
    cache = make_cache(model)
    logits = model(mx.array([[1, 2, 3]]), cache=cache)
    assert cache[0].keys.dtype == mx.bfloat16 and logits.dtype == mx.bfloat16
