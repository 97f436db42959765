"""The picker's catalog: models found on disk (hub cache, conversions, broken ones), fit verdicts, published ids."""

import json
import shutil

import pytest

from apertus_mlx.load import DEMO_MODEL
from apertus_mlx.model_info import RUNTIME_OVERHEAD, USABLE_RAM, fits_in_ram
from quant_recipes import budget
from tui import catalog

DEMO_CONFIG = json.loads((DEMO_MODEL / "config.json").read_text())


def snapshot(cache, repo_id, config, commit="0123456789abcdef0123456789abcdef01234567", weights=1000):
    """A model repo laid out as huggingface_hub caches it: blobs, a snapshot per commit, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (snap / "config.json").write_text(json.dumps(config))
    (snap / "model.safetensors").write_bytes(b"\0" * weights)
    return snap


def converted(models_dir, name, bpw=4.21):
    out = models_dir / name
    out.mkdir(parents=True)
    config = dict(DEMO_CONFIG, quantization_recipe={"name": "budget", "budget": "a 8 GB Mac"})
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").write_bytes(b"\0" * 2000)
    (out / "quality.json").write_text(json.dumps({"bits_per_weight": bpw}))
    return out


@pytest.fixture
def disk(tmp_path, monkeypatch):
    cache, models = tmp_path / "hub", tmp_path / "models"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snapshot(cache, "swiss-ai/Apertus-Tiny", DEMO_CONFIG)
    snapshot(cache, "someone/llama-tiny", dict(DEMO_CONFIG, model_type="llama"))  # not Apertus: left out
    converted(models, "Apertus-Tiny-budget-8gb")
    broken = models / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (models / ".Apertus-Tiny-budget-16gb.partial-x1").mkdir()  # a conversion being written: never listed
    (models / "notes.txt").write_text("not a model")
    return cache, models


def test_local_models_lists_the_hub_cache_then_conversions_and_broken_ones_with_their_error(disk):
    _cache, models = disk
    found = catalog.local_models(models)
    assert [(m.name, m.origin) for m in found] == [
        ("swiss-ai/Apertus-Tiny", "hub cache"),
        ("Apertus-Tiny-budget-8gb", "converted"),
        ("broken", "converted"),
    ]
    hub, conversion, broken = found
    assert hub.path.parent.name == "snapshots" and hub.info.weights_bytes == 1000 and hub.quantization == "BF16"
    assert conversion.quantization == "budget 4.21 bpw" and conversion.size_bytes == 2000
    assert broken.info is None and broken.quantization == "?" and broken.fits(16e9) is None
    assert "config.json" in broken.error and "\n" not in broken.error


def test_hub_cache_location_follows_the_environment(tmp_path, monkeypatch):
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert catalog.hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert catalog.hub_cache_dir() == tmp_path / "elsewhere"
    # No cache at all, no models dir: nothing to list, no error.
    assert catalog.local_models(tmp_path / "no-models") == []


def test_conversions_go_to_the_apps_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("APERTUS_CHAT_HOME", str(tmp_path / "home"))
    assert catalog.default_models_dir() == tmp_path / "home" / "models"
    out = catalog.conversion_dir("swiss-ai/Apertus-8B-Instruct-2509", 16)
    assert out == tmp_path / "home" / "models" / "Apertus-8B-Instruct-2509-budget-16gb"


def test_a_moved_snapshot_is_read_from_the_revision_main_points_at(disk):
    cache, models = disk
    repo = cache / "models--swiss-ai--Apertus-Tiny"
    old = repo / "snapshots" / ("f" * 40)
    shutil.copytree(repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567", old)
    (old / "model.safetensors").write_bytes(b"\0" * 10)
    (hub,) = [m for m in catalog.local_models(models) if m.origin == "hub cache"]
    assert hub.info.weights_bytes == 1000


def test_the_fit_rule_is_weights_plus_an_8k_chat_plus_overhead_within_the_usable_share():
    assert budget.USABLE_RAM is USABLE_RAM and budget.RUNTIME_OVERHEAD is RUNTIME_OVERHEAD  # one rule for both
    ram = 16e9
    room = USABLE_RAM * ram - RUNTIME_OVERHEAD
    kv = 131072  # Apertus-8B: 1.07 GB for 8192 tokens
    assert fits_in_ram(room - kv * 8192, kv, ram)
    assert not fits_in_ram(room - kv * 8192 + 1, kv, ram)
    assert fits_in_ram(room - kv * 100, kv, ram, context=100)
    # The budget recipe's --ram-gb target is exactly the largest weights that fit.
    target = budget.target_bytes(budget.Budget(ram_gb=16, context=8192), 8_000_000_000, kv)
    assert fits_in_ram(target, kv, ram) and not fits_in_ram(target + 1, kv, ram)


def test_verdicts_labels_and_names():
    info = catalog.LocalModel("x", DEMO_MODEL, "converted", info=catalog.describe_model(DEMO_MODEL))
    need = info.info.memory_bytes(8192)
    assert info.fits((need + RUNTIME_OVERHEAD) / USABLE_RAM) and not info.fits(
        (need + RUNTIME_OVERHEAD) / USABLE_RAM - 1
    )
    assert info.fits(None) is None
    assert [catalog.fit_label(v) for v in (True, False, None)] == ["yes", "no", "?"]
    assert catalog.format_size(16.1e9) == "16.1 GB" and catalog.format_size(2.3e9, estimated=True) == "~2.3 GB"
    assert catalog.format_size(850e6) == "850 MB" and catalog.format_size(None) == "?"
    assert catalog.ram_gb_for(16 * 2**30) == 17.17 and catalog.ram_gb_for(8_000_000_000) == 8
    out = catalog.conversion_dir("swiss-ai/Apertus-8B-Instruct-2509", 17.17, "/m")
    assert out.as_posix() == "/m/Apertus-8B-Instruct-2509-budget-17.17gb"
    assert catalog.conversion_dir("/tmp/src/demo", 8.0, "/m").name == "demo-budget-8gb"
    ram = catalog.total_ram_bytes()
    assert ram is None or ram > 2**28


def test_every_published_id_says_where_it_comes_from():
    ids = [m.repo_id for m in catalog.PUBLISHED]
    assert len(ids) == len(set(ids))
    for model in catalog.PUBLISHED:
        assert model.source.startswith("https://"), model.repo_id
        assert model.evidence and model.size_bytes > 0 and model.kv_bytes_per_token > 0
        assert model.family in ("official MLX", "community MLX", "original")
        assert model.convertible == (model.quantization == "BF16")
        assert catalog.original_of(model) is not None, model.repo_id  # every build has a listed original
    by_id = {m.repo_id: m for m in catalog.PUBLISHED}
    gib16 = 16 * 2**30
    assert by_id["swiss-ai/Apertus-8B-Instruct-2509"].fits(gib16) is False  # 16 GB of BF16 on a 16 GB Mac
    assert by_id["mlx-community/Apertus-8B-Instruct-2509-4bit"].fits(gib16) is True
    assert by_id["mlx-community/Apertus-8B-Instruct-2509-4bit"].fits(None) is None
    assert catalog.original_of(by_id["mlx-community/Apertus-8B-Instruct-2509-6bit"]).repo_id == (
        "swiss-ai/Apertus-8B-Instruct-2509"
    )
    assert catalog.original_of(by_id["swiss-ai/Apertus-v1.1-4B-Instruct-MLX-INT4"]).repo_id == (
        "swiss-ai/Apertus-v1.1-4B-Instruct"
    )
    assert by_id["swiss-ai/Apertus-v1.1-4B-Instruct-MLX-INT4"].size_estimated is False
