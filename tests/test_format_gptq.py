"""GPTQ (+ EoRA) checkpoints in GPTQModel's layout load into MLX affine layers that compute the format's weights."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import apertus_mlx
from apertus_mlx import formats
from apertus_mlx.errors import CheckpointError, ConfigError
from apertus_mlx.formats import gptq
from apertus_mlx.lowrank import LowRankQuantizedLinear

from checkpoints import LINEARS, make_reference, max_rel_error, reference_logits, save_reference, silence_special_tokens
from gptq_fixtures import Plan, float_checkpoint, write_gptq

SHAPE = {"hidden": 128, "intermediate": 256, "heads": 4, "kv_heads": 2, "layers": 2}
# Layer 0 mimics the published mix's boundary layers (INT8 attention, higher rank), with 3- and 2-bit MLPs.
DYNAMIC = {
    r"-:model\.layers\.1\.self_attn\.o_proj": {},
    r"+:model\.layers\.0\.mlp\.up_proj": {"bits": 3, "group_size": 32},
    r"model\.layers\.0\.mlp\.down_proj": {"bits": 2, "group_size": 128},
    r"model\.layers\.1\.mlp\.down_proj": {"group_size": -1},
    r"model\.layers\.\d+\.self_attn\.": {"bits": 8},
}


def mixed_plan(fmt: str, sym: bool, adapters: str | None, float_dtype: str = "float32") -> Plan:
    """Settings each module resolves to under DYNAMIC (written out by hand), and EoRA ranks 16 / 4."""
    modules: dict = {}
    for i in range(SHAPE["layers"]):
        for name in LINEARS:
            modules[f"model.layers.{i}.{name}"] = (8, 64, sym) if "attn" in name else (4, 64, sym)
    modules["model.layers.1.self_attn.o_proj"] = None
    modules["model.layers.0.mlp.up_proj"] = (3, 32, sym)
    modules["model.layers.0.mlp.down_proj"] = (2, 128, sym)
    modules["model.layers.1.mlp.down_proj"] = (4, -1, sym)
    ranks = {m: 16 if ".0." in m else 4 for m, s in modules.items() if s} if adapters else {}
    return Plan(
        fmt=fmt, sym=sym, dynamic=DYNAMIC, modules=modules, ranks=ranks, adapters=adapters, float_dtype=float_dtype
    )


PLANS = {
    "gptq-sym-peft": mixed_plan("gptq", True, "peft"),
    "gptq_v2-asym-merged": mixed_plan("gptq_v2", False, "merged"),
    "gptq-asym": mixed_plan("gptq", False, None),
    "gptq_v2-sym-bf16-peft": mixed_plan("gptq_v2", True, "peft-root", "bfloat16"),
}
EXACT = [k for k in PLANS if "bf16" not in k]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    reference = silence_special_tokens(make_reference(**SHAPE))
    return reference, save_reference(reference, tmp_path_factory.mktemp("float"))


@pytest.fixture(scope="module", params=list(PLANS))
def written(request, source, tmp_path_factory):
    """(plan name, GPTQ directory, its modules with their reference weights)."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, write_gptq(source[1], path, PLANS[request.param])


@pytest.fixture(scope="module")
def loaded(written):
    name, path, modules = written
    model, summary = gptq.load_model(path)
    return name, model, summary, modules


def test_detected_as_gptq(written):
    assert formats.detect(written[1]) == "gptq"


def test_each_layer_computes_the_formula(loaded):
    """Dequantized MLX weights equal scale·(q − zero) exactly, whatever the model's dtype."""
    name, model, _, modules = loaded
    layers = dict(model.named_modules())
    for module, m in modules.items():
        layer = layers[module]
        assert isinstance(layer, LowRankQuantizedLinear) == (m.lora is not None), module
        assert layer.scales.dtype == layer.biases.dtype == mx.float32, module
        w = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits)
        np.testing.assert_array_equal(np.array(w), m.dequantized().astype(np.float32), err_msg=module)
        if m.lora is not None:
            a, b = (np.array(t.astype(mx.float32)) for t in (layer.lora_a, layer.lora_b))
            tol = 2**-8 if "bf16" in name else 0
            np.testing.assert_allclose(a, m.lora[0], rtol=tol, atol=0, err_msg=module)
            np.testing.assert_allclose(b, m.lora[1], rtol=tol, atol=0, err_msg=module)
    assert type(layers["model.layers.1.self_attn.o_proj"]) is nn.Linear  # `-:` in dynamic
    x = mx.random.normal((3, SHAPE["hidden"]), key=mx.random.key(0))
    q = layers["model.layers.0.self_attn.q_proj"]
    m = modules["model.layers.0.self_attn.q_proj"]
    if "bf16" not in name:
        np.testing.assert_allclose(np.array(q(x)), np.array(x) @ m.effective().T, rtol=1e-4, atol=1e-5)
    else:  # float32 scales do not promote the bf16 model's activations
        xb = x.astype(mx.bfloat16)
        assert q(xb).dtype == layers["model.layers.1.mlp.up_proj"](xb).dtype == mx.bfloat16


def test_summary(loaded):
    name, _, summary, _ = loaded
    fmt, sym = name.split("-")[:2]
    assert summary.format.startswith(f"GPTQ ({fmt}, {sym}, g64)")
    assert summary.format.endswith("+ EoRA") == ("peft" in name or "merged" in name)
    ranked = " + EoRA r16" if summary.format.endswith("EoRA") else ""
    assert summary.modules[f"INT3 g32{ranked}"] == 128 * 256
    assert summary.modules["INT4 per-channel" + ranked.replace("16", "4")] == 256 * 128
    assert summary.modules["BF16" if "bf16" in name else "F32"] > 0
    assert 4 < summary.bits_per_weight < 32
    assert any("unquantized by `dynamic`" in note for note in summary.notes)


@pytest.mark.parametrize("plan", EXACT)
def test_logits_match_transformers_on_the_dequantized_weights(plan, source, tmp_path):
    reference, float_dir = source
    modules = write_gptq(float_dir, tmp_path, PLANS[plan])
    state = {f"{m}.weight": torch.from_numpy(w.effective()).float() for m, w in modules.items()}
    patched = make_reference(**SHAPE)
    patched.load_state_dict({**reference.state_dict(), **state})
    ids = np.array([[5, 17, 42, 99, 200, 7, 63]])
    ours = np.array(gptq.load_model(tmp_path)[0](mx.array(ids)))
    assert max_rel_error(ours, reference_logits(patched, ids)) < 1e-4


@pytest.mark.parametrize("written", EXACT, indirect=True)
def test_greedy_chat_equals_the_dequantized_float_checkpoint(written, tmp_path):
    _, path, modules = written
    model, tokenizer = apertus_mlx.load(path)
    assert model.import_summary.format.startswith("GPTQ")
    float_model, float_tokenizer = apertus_mlx.load(float_checkpoint(path, tmp_path / "float", modules))
    prompt = "Grüezi! What is the capital of Switzerland?"
    answer = apertus_mlx.generate(model, tokenizer, prompt, temperature=0, max_tokens=16)
    assert answer == apertus_mlx.generate(float_model, float_tokenizer, prompt, temperature=0, max_tokens=16)
    assert answer


@pytest.fixture(scope="module")
def plain(source, tmp_path_factory):
    """An all-4-bit g64 checkpoint with PEFT adapters of rank 8, to break for the refusals."""
    modules = {f"model.layers.{i}.{n}": (4, 64, True) for i in range(SHAPE["layers"]) for n in LINEARS}
    plan = Plan(modules=modules, ranks=dict.fromkeys(modules, 8), adapters="peft")
    path = tmp_path_factory.mktemp("plain")
    write_gptq(source[1], path, plan)
    return path


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(file, edit):
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def test_plain_checkpoint_loads(plain):
    model, summary = gptq.load_model(plain, lazy=True)
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 384)
    assert summary.format == "GPTQ (gptq_v2, sym, g64) + EoRA"
    assert set(summary.modules) == {"INT4 g64 + EoRA r8", "F32"}


Q = "model.layers.0.self_attn.q_proj"


def _refused(plain, tmp_path, config=None, tensors=None, adapter=None):
    path = tmp_path / "broken"
    shutil.copytree(plain, path)
    if config:
        _edit_config(path, **config)
    if tensors:
        _edit_tensors(path / "model.safetensors", tensors)
    if adapter:
        _edit_tensors(path / "eora" / "adapter_model.safetensors", adapter)
    return path


def _permute_g_idx(t):
    t[f"{Q}.g_idx"] = np.random.default_rng(0).permutation(t[f"{Q}.g_idx"])


@pytest.mark.parametrize(
    ("edits", "error", "message"),
    [
        ({"config": {"desc_act": True}, "tensors": _permute_g_idx}, ConfigError, f"desc_act .*: {Q}$"),
        ({"config": {"bits": 5, "dynamic": {}}}, ConfigError, r"bits=5 \(model\.layers\.\d\.\S+\) is not supported"),
        ({"tensors": lambda t: t.pop(f"{Q}.qzeros")}, CheckpointError, f"lacks tensor {Q}.qzeros$"),
        (
            {"adapter": lambda t: t.update({f"base_model.model.{Q}.lora_A.weight": np.zeros((8, 100), np.float16)})},
            CheckpointError,
            rf"EoRA adapter base_model\.model\.{Q}\.lora_A\.weight: A \(8, 100\)",
        ),
        ({"config": {"checkpoint_format": "marlin"}}, ConfigError, "checkpoint_format 'marlin' is not supported"),
    ],
    ids=["desc_act", "bits", "qzeros", "adapter-shape", "format"],
)
def test_refusals_name_the_module(plain, tmp_path, edits, error, message):
    with pytest.raises(error, match=message) as caught:
        gptq.load_model(_refused(plain, tmp_path, **edits))
    assert "\n" not in str(caught.value)


def test_low_rank_layer_round_trips_through_its_params():
    base = nn.QuantizedLinear(128, 32, bias=False, group_size=64, bits=4)
    a = mx.random.normal((6, 128), key=mx.random.key(1))
    b = mx.random.normal((32, 6), key=mx.random.key(2))
    layer = LowRankQuantizedLinear.from_quantized(base, a, b)
    x = mx.random.normal((2, 5, 128), key=mx.random.key(3))
    np.testing.assert_allclose(np.array(layer(x)), np.array(base(x) + (x @ a.T) @ b.T), rtol=1e-5, atol=1e-5)
    params = layer.quant_params()
    assert params == {"group_size": 64, "bits": 4, "mode": "affine", "low_rank": 6}
    empty = LowRankQuantizedLinear.empty(128, 32, params)
    assert {k: v.shape for k, v in empty.parameters().items()} == {k: v.shape for k, v in layer.parameters().items()}
    empty.update(layer.parameters())
    np.testing.assert_array_equal(np.array(empty(x)), np.array(layer(x)))
