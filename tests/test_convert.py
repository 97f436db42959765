"""Recipes and `python -m apertus_mlx.convert`: bits where the recipe says, honest reports, atomic output."""

import dataclasses
import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model as mlx_lm_load_model

import apertus_mlx
from apertus_mlx import ConfigError
from quant_recipes import budget, pipeline
from quant_recipes.calibration import default_texts, token_sequences
from quant_recipes.convert import convert
from quant_recipes.recipe import load_recipe, parse_recipe, shipped_recipes

from checkpoints import make_reference, save_reference


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    model = make_reference(hidden=128, intermediate=256, layers=6, heads=4, kv_heads=2, seed=3)
    return save_reference(model, tmp_path_factory.mktemp("src") / "bf16")


@pytest.fixture(scope="module")
def uniform(source, tmp_path_factory):
    """Every uniform recipe converted once: {(bits, group): (output dir, report)}."""
    out = tmp_path_factory.mktemp("uniform")
    results = {}
    for bits in (2, 3, 4, 5, 6, 8):
        for group in (32, 64):
            name = f"int{bits}-g{group}"
            results[bits, group] = (out / name, convert(source, load_recipe(name), out / name, eval_sequences=4))
    return results


def quantized_layers(model) -> dict[str, tuple[int, int]]:
    return {p: (m.bits, m.group_size) for p, m in model.named_modules() if hasattr(m, "bits")}


def test_uniform_recipes_put_the_right_bits_everywhere(source, uniform):
    params = sum(a.size for _, a in tree_flatten(apertus_mlx.load_model(source).parameters()))
    for (bits, group), (path, report) in uniform.items():
        model = apertus_mlx.load_model(path)
        layers = quantized_layers(model)
        assert len(layers) == 6 * 6 + 2  # q, k, v, o, up and down in each layer, the embedding and the head
        assert set(layers.values()) == {(bits, group)}
        # Bits per weight: every stored byte, over the original parameter count.
        stored = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
        assert report["bits_per_weight"] == pytest.approx(stored * 8 / params)
        assert report["bits_per_weight"] == pytest.approx(bits + 32 / group, abs=0.05)
        assert report["size_bytes"] == sum(f.stat().st_size for f in path.glob("*.safetensors"))
        assert json.loads((path / "quality.json").read_text()) == report
        assert report["warnings"] == []


def test_more_bits_less_error(uniform):
    for group in (32, 64):
        kl = [uniform[bits, group][1]["kl_divergence"] for bits in (2, 3, 4, 5, 6, 8)]
        assert kl == sorted(kl, reverse=True) and kl[-1] < 1e-2 * kl[0]
        agreement = [uniform[bits, group][1]["top1_agreement"] for bits in (2, 4, 8)]
        assert agreement == sorted(agreement)
    for bits in (2, 3, 4):  # smaller groups are more precise
        assert uniform[bits, 32][1]["kl_divergence"] < uniform[bits, 64][1]["kl_divergence"]


def test_report_matches_a_direct_numpy_computation(source, uniform):
    path, report = uniform[3, 64]
    original = apertus_mlx.load_model(source)
    original.set_dtype(mx.bfloat16)  # the report's reference is the bf16 model
    quantized, tokenizer = apertus_mlx.load(path)
    tokens = token_sequences(tokenizer, default_texts()[1], 4, 256, "evaluation")
    lp = np.array(nn.log_softmax(original(tokens).astype(mx.float32), axis=-1))[:, :-1]
    lq = np.array(nn.log_softmax(quantized(tokens).astype(mx.float32), axis=-1))[:, :-1]
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    targets = np.array(tokens)[:, 1:, None]
    ppl = np.exp(-np.take_along_axis(lq, targets, axis=-1).mean())
    assert report["kl_divergence"] == pytest.approx(kl, rel=2e-3)
    assert report["top1_agreement"] == pytest.approx((lp.argmax(-1) == lq.argmax(-1)).mean(), abs=2e-3)
    assert report["perplexity_quantized"] == pytest.approx(ppl, rel=2e-3)
    assert report["evaluation_tokens"] == lp.shape[0] * lp.shape[1]


def test_mixed_recipe_bits_land_where_its_rules_say(source, tmp_path):
    convert(source, load_recipe("apertus-mixed-3"), tmp_path / "mixed", eval_sequences=2)
    layers = quantized_layers(apertus_mlx.load_model(tmp_path / "mixed"))
    for i in range(6):
        edge = i in (0, 1, 4, 5)
        for name in ("q_proj", "k_proj", "o_proj"):
            assert layers[f"model.layers.{i}.self_attn.{name}"] == (5 if edge else 3, 64)
        assert layers[f"model.layers.{i}.self_attn.v_proj"] == (5 if edge else 4, 64)
        assert layers[f"model.layers.{i}.mlp.down_proj"] == (5 if edge else 4, 64)
        assert layers[f"model.layers.{i}.mlp.up_proj"] == (5 if edge else 3, 64)
    assert layers["lm_head"] == layers["model.embed_tokens"] == (6, 64)


@pytest.mark.parametrize("target", [{"bits_per_weight": 3.5}, {"bits_per_weight": 2.8}, {"size_gb": 0.0004}])
def test_budget_recipe_meets_its_target(source, tmp_path, target):
    table = {**target, "choices": [2, 3, 4, 6], "group_sizes": [64, 128]}
    recipe = parse_recipe({"name": "b", "bits": 4, "group_size": 64, "budget": table})
    report = convert(source, recipe, tmp_path / "b", eval_sequences=2)
    if "bits_per_weight" in target:
        assert report["bits_per_weight"] == pytest.approx(target["bits_per_weight"], rel=0.02)
        assert report["bits_per_weight"] <= target["bits_per_weight"]
    else:
        weights = sum(a.nbytes for _, a in tree_flatten(apertus_mlx.load_model(tmp_path / "b").parameters()))
        assert weights == pytest.approx(target["size_gb"] * 1e9, rel=0.02) and weights <= target["size_gb"] * 1e9
    widths = set(quantized_layers(apertus_mlx.load_model(tmp_path / "b")).values())
    assert len(widths) > 1 and widths <= {(b, g) for b in (2, 3, 4, 6) for g in (64, 128)}
    assert set(report["layers"]) == {f"{b}-bit g{g}" for b, g in widths} and sum(report["layers"].values()) == 38


def _kl(p_logits: mx.array, q_logits: mx.array) -> float:
    lp, lq = nn.log_softmax(p_logits.astype(mx.float32), -1), nn.log_softmax(q_logits.astype(mx.float32), -1)
    return (mx.exp(lp) * (lp - lq)).sum(-1).mean().item()


@pytest.mark.parametrize("tied", [False, True])
def test_budget_measures_every_module_in_kl_of_the_whole_model(tmp_path, tied):
    src = save_reference(make_reference(hidden=128, intermediate=256, layers=2, tie=tied, seed=5), tmp_path / "m")
    model = apertus_mlx.load_model(src)
    recipe = parse_recipe({"name": "b", "bits": 4, "group_size": 64, "budget": {"bits_per_weight": 3}})
    plan = {p: recipe.assign(p, 2) for p in pipeline.quantizable_modules(model)}
    tokens = mx.array(np.random.default_rng(0).integers(0, 384, size=(4, 64)))
    # Trying widths on a projection leaves the layer as it was.
    narrow, wide = (2, 64), (8, 64)
    layer, h = model.layers[0], model.model.embed_tokens(tokens)
    before = layer(h, "causal", None)
    budget._residual_errors(layer, layer.mlp.down_proj, h, plan["model.layers.0.mlp.down_proj"], (narrow, wide))
    assert mx.array_equal(layer(h, "causal", None), before).item()

    widths = ((2, 128), (2, 64), (4, 64), (8, 64))
    errors = budget.measure_sensitivity(model, plan, tokens, widths)
    assert set(errors) == set(plan)  # the head (or the tied embedding in both roles) is allocated too
    for path, by_width in errors.items():
        assert by_width[2, 128] > by_width[2, 64] > by_width[4, 64] > by_width[8, 64] > 0, path
    # Each is the KL the whole model gets from rounding that module alone (a probe's estimate, so within 2x).
    original = apertus_mlx.load_model(src)
    reference = original(tokens)
    for path in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj", "model.embed_tokens"):
        changed = apertus_mlx.load_model(src)
        module = dict(changed.named_modules())[path]
        module.weight = budget._rounded(module.weight.astype(mx.float32), plan[path], narrow).astype(mx.bfloat16)
        assert 0.5 < errors[path][narrow] / _kl(reference, changed(tokens)) < 2, path


def test_budget_offers_a_module_only_group_sizes_that_divide_its_inputs():
    assert budget._fitting(((2, 64), (2, 128), (3, 64)), 192, "x") == ((2, 64), (3, 64))
    with pytest.raises(ConfigError, match=r"^up_proj: no budget group size divides its 96 inputs$"):
        budget._fitting(((2, 64),), 96, "up_proj")


def test_budget_allocation_takes_the_best_error_drop_per_byte():
    a4 = parse_recipe({"name": "b", "bits": 4, "group_size": 64}).assign("x", 1)
    shapes = {"a": (64, 256), "b": (64, 256)}
    plan = {"a": a4, "b": a4}
    size = {
        w: pipeline.packed_bytes(shapes["a"], dataclasses.replace(a4, bits=w[0], group_size=w[1]))
        for w in [(2, 128), (2, 64), (3, 128), (4, 64)]
    }
    # (2, 64) costs more than (2, 128) and barely helps: a mix of its neighbours beats it, so it is never taken.
    errors = {
        "a": {(2, 128): 1.0, (2, 64): 0.95, (3, 128): 0.3, (4, 64): 0.1},
        "b": {(2, 128): 0.2, (2, 64): 0.19, (3, 128): 0.1, (4, 64): 0.05},
    }
    hull = [w for _, _, w in budget._hull(shapes["a"], a4, errors["a"])]
    assert hull == [(2, 128), (3, 128), (4, 64)]
    # Room for one step: `a` gains 0.7 for it, `b` only 0.1.
    one_step = 2 * size[2, 128] + size[3, 128] - size[2, 128]
    chosen = budget.allocate(plan, shapes, errors, one_step)
    assert (chosen["a"].bits, chosen["a"].group_size) == (3, 128)
    assert (chosen["b"].bits, chosen["b"].group_size) == (2, 128)
    # More room never makes the summed error worse, and every plan fits its budget.
    previous = float("inf")
    for room in range(2 * size[2, 128], 2 * size[4, 64] + 1, 256):
        chosen = budget.allocate(plan, shapes, errors, room)
        widths = {p: (a.bits, a.group_size) for p, a in chosen.items()}
        assert sum(size[w] for w in widths.values()) <= room
        assert (2, 64) not in widths.values()
        total = sum(errors[p][w] for p, w in widths.items())
        assert total <= previous
        previous = total
    assert previous == pytest.approx(0.15)  # everything at its widest


def test_budget_that_cannot_be_met(source, tmp_path):
    recipe = parse_recipe({"name": "b", "bits": 4, "group_size": 64, "budget": {"bits_per_weight": 1.0}})
    with pytest.raises(ConfigError, match="cannot be met: even 2-bit layers in groups of 64 need"):
        convert(source, recipe, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_budget_recipe_takes_its_target_from_the_command_line(source, tmp_path):
    out = tmp_path / "b"
    recipe = tmp_path / "budget.toml"  # the shipped `budget`, with fewer widths and plain rounding to keep CI quick
    recipe.write_text(
        'name = "budget"\nbits = 4\ngroup_size = 64\n[budget]\nbits_per_weight = 4.0\nchoices = [2, 3, 4]\n'
        "group_sizes = [64, 128]\n"
    )
    result = run_cli(
        "--model",
        str(source),
        "--recipe",
        str(recipe),
        "--bits-per-weight",
        "3.3",
        "--out",
        str(out),
        "--eval-sequences",
        "1",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "quality.json").read_text())
    assert 3.3 * 0.98 <= report["bits_per_weight"] <= 3.3 and report["budget"] == "3.3 bits per weight"
    recorded = json.loads((out / "config.json").read_text())["quantization_recipe"]
    assert recorded["name"] == "budget" and recorded["budget"] == "3.3 bits per weight"
    assert "| size target | 3.3 bits per weight |" in (out / "QUALITY.md").read_text()
    # Only budget recipes take a target.
    result = run_cli("--model", str(source), "--recipe", "int4-g64", "--ram-gb", "8", "--out", str(tmp_path / "x"))
    assert result.returncode == 1 and not (tmp_path / "x").exists()
    assert result.stderr.strip() == "error: recipe int4-g64 has no [budget] table, so it takes no size target"


def test_a_new_target_keeps_the_recipe_widths():
    recipe = load_recipe("budget-8gb-mac").with_target(ram_gb=16)
    assert recipe.budget.ram_gb == 16 and recipe.budget.context == 8192 and recipe.budget.bits_per_weight is None
    assert recipe.budget.widths(64) == load_recipe("budget-8gb-mac").budget.widths(64)
    assert recipe.budget.target == "a 16 GB Mac, 8192-token context"
    assert load_recipe("budget").with_target(size_gb=4.2).budget.target == "4.2 GB of weights"


def test_mlx_lm_loads_our_output_with_the_same_logits(uniform):
    path, _ = uniform[4, 64]
    ours = apertus_mlx.load_model(path)
    theirs, _ = mlx_lm_load_model(path)
    ids = mx.array(np.arange(5, 45).reshape(2, 20))
    np.testing.assert_allclose(
        np.array(ours(ids).astype(mx.float32)), np.array(theirs(ids).astype(mx.float32)), atol=1e-5
    )
    recipe = json.loads((path / "config.json").read_text())["quantization_recipe"]
    assert recipe["name"] == "int4-g64" and len(recipe["content_sha256"]) == 16
    assert (path / "tokenizer.json").is_file() and (path / "QUALITY.md").read_text().startswith("# Quality report")


def test_conversion_releases_each_layers_full_precision_weights(source, tmp_path):
    active = []

    def progress(layers, description, total):
        for i in layers:
            active.append(mx.get_active_memory())  # before layer i is quantized
            yield i

    convert(source, load_recipe("int4-g64"), tmp_path / "q", progress=progress, eval_sequences=1)
    layer = 2 * sum(a.size for _, a in tree_flatten(apertus_mlx.load_model(source).layers[0].parameters()))  # bf16
    per_layer = (active[-1] - active[0]) / (len(active) - 1)
    # What stays of a layer is its 4-bit copy (~0.3x); had its bf16 weights been kept, it would be ~1.3x.
    assert 0.2 * layer < per_layer < 0.4 * layer


def test_failure_midway_leaves_no_output(source, tmp_path, monkeypatch):
    real = pipeline.quantize_linear
    calls = []

    def failing(linear, assignment, stats):
        calls.append(1)
        if len(calls) == 10:
            raise RuntimeError("simulated crash in the middle of layer 1")
        return real(linear, assignment, stats)

    monkeypatch.setattr(pipeline, "quantize_linear", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert(source, load_recipe("int4-g64"), tmp_path / "out", eval_sequences=2)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten_by_default(source, uniform, tmp_path):
    path, _ = uniform[8, 64]
    with pytest.raises(apertus_mlx.ApertusError, match="already exists"):
        convert(source, load_recipe("int8-g64"), path)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"bits": 4, "group_size": 64}, "r.toml: missing key 'name'"),
        ({"name": "x", "bits": 7, "group_size": 64}, "r.toml: bits 7 is not one of 2, 3, 4, 5, 6, 8"),
        ({"name": "x", "bits": 4, "group_size": 48}, "r.toml: group_size 48 is not one of 32, 64, 128"),
        ({"name": "x", "bits": 4, "group_size": 64, "mode": "mxfp4"}, "mode mxfp4 needs bits=4 and group_size=32"),
        ({"name": "x", "bits": 4, "group_size": 64, "method": "magic"}, "method 'magic' is not one of"),
        ({"name": "x", "bits": 4, "group_size": 64, "colour": 1}, "r.toml: unknown key 'colour'"),
        ({"name": "x", "bits": 4, "group_size": 64, "rules": [{"bits": 2}]}, "rules[0]: 'match' must be"),
        (
            {"name": "x", "bits": 4, "group_size": 64, "rules": [{"match": "*", "layers": [0]}]},
            "rules[0]: 'layers' must be [first, last]",
        ),
        ({"name": "x", "bits": 4, "group_size": 64, "rules": [{"match": "*", "bitz": 2}]}, "unknown key 'bitz'"),
        ({"name": "x", "bits": 4, "group_size": 64, "budget": {"ram_gb": 8, "size_gb": 2}}, "exactly one of"),
        ({"name": "x", "bits": 4, "group_size": 64, "calibration": {"sequences": 0}}, "calibration.sequences must"),
        (
            {"name": "x", "bits": 4, "group_size": 64, "budget": {"size_gb": 2, "group_sizes": [48]}},
            "r.toml: budget: group_sizes must be from 32, 64, 128",
        ),
        (
            {"name": "x", "bits": 4, "group_size": 32, "mode": "mxfp4", "budget": {"size_gb": 2}},
            "r.toml: a budget chooses affine widths; mode mxfp4 has one fixed width",
        ),
    ],
)
def test_bad_recipes_name_the_key(recipe, message):
    with pytest.raises(ConfigError) as e:
        parse_recipe(recipe, "r.toml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_recipe_files_that_cannot_be_read(tmp_path):
    (tmp_path / "bad.toml").write_text("name = ")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_recipe(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="unknown recipe 'int9'; shipped recipes: apertus-mixed-2"):
        load_recipe("int9")


def test_shipped_recipes_are_valid():
    names = {r.name for r in shipped_recipes()}
    assert {f"int{b}-g{g}" for b in (2, 3, 4, 5, 6, 8) for g in (32, 64)} <= names
    assert {"apertus-mixed-2", "apertus-mixed-3", "apertus-mixed-4", "budget", "budget-8gb-mac"} <= names
    assert {f"{m}-{b}-g64" for m in ("gptq", "awq", "distill") for b in (2, 3, 4)} <= names


def run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "apertus_mlx.convert", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_lists_recipes():
    result = run_cli("--list-recipes")
    assert result.returncode == 0
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["recipe", "bpw", "(8B)", "description"]
    assert len(lines) == len(shipped_recipes())
    rows = {line.split()[0]: line.split()[1] for line in lines}
    assert rows["int4-g64"] == "4.50" and rows["int2-g32"] == "3.00" and rows["budget-8gb-mac"] == "target"
    assert 3.5 < float(rows["apertus-mixed-2"]) < 4.0  # 2-bit base, wider boundary layers and projections


def test_cli_converts_with_progress_and_summary(source, tmp_path):
    result = run_cli(
        "--model", str(source), "--recipe", "int4-g32", "--out", str(tmp_path / "q"), "--eval-sequences", "2"
    )
    assert result.returncode == 0, result.stderr
    assert "quantizing layers" in result.stderr  # the progress bar
    assert result.stdout.startswith(f"{tmp_path / 'q'}: 5.0") and "KL " in result.stdout
    assert apertus_mlx.load_model(tmp_path / "q").layers[0].mlp.up_proj.bits == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--recipe", "int4-g64", "--out", "x"], "the following arguments are required: --model"),
        (["--model", "/nope", "--recipe", "int4-g64", "--out", "x"], "error: model path /nope does not exist"),
        (["--model", ".", "--recipe", "int9", "--out", "x"], "error: unknown recipe 'int9'"),
    ],
)
def test_cli_bad_input(args, message):
    result = run_cli(*args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def nano_rtn(tmp_path_factory):
    from apertus_mlx.load import DEMO_MODEL

    small_calibration = {"sequences": 8, "sequence_length": 128}
    out = tmp_path_factory.mktemp("nano")
    rtn = dataclasses.replace(load_recipe("int3-g64"), calibration=small_calibration)
    return DEMO_MODEL, small_calibration, out, convert(DEMO_MODEL, rtn, out / "rtn", eval_sequences=4)


@pytest.mark.parametrize("method", ["gptq", "distill"])
def test_calibrated_methods_beat_rtn_on_a_trained_model(nano_rtn, method):
    # The bundled demo model is trained, so its weights and activations have real structure. (`awq` lowers
    # each layer's error but this model's KL by only 1-3%; see tests/test_quant_methods.py.)
    source, calibration, out, rtn = nano_rtn
    recipe = dataclasses.replace(load_recipe(f"{method}-3-g64"), calibration=calibration)
    report = convert(source, recipe, out / method, eval_sequences=4)
    assert report["bits_per_weight"] == pytest.approx(rtn["bits_per_weight"])
    assert report["calibration_tokens"] == 8 * 128
    # 1024 tokens for the 768-wide down_proj: enough here, but thin, and the report says so.
    assert report["warnings"] == [
        "only 1024 calibration tokens for layers with up to 768 inputs; calibrated methods may overfit them: "
        "pass --calibration-text with at least 3072 tokens of representative text"
    ]
    assert report["kl_divergence"] < 0.95 * rtn["kl_divergence"]
