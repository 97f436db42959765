"""Quantized checkpoints in mlx-lm's format load in ours, and ours load in mlx-lm, with identical logits."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import convert
from mlx_lm.utils import load_model as mlx_lm_load_model

import apertus_mlx

from checkpoints import make_reference, max_rel_error, reference_logits, save_reference

IDS = np.arange(3, 35).reshape(2, 16)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    # mlx-lm's own Apertus port reads only the transformers 4.x schema, so its converter gets that one.
    ref = make_reference(hidden=128, intermediate=256, heads=4, kv_heads=2, seed=11)
    return ref, save_reference(ref, tmp_path_factory.mktemp("hf") / "ckpt", schema="v4")


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)).astype(mx.float32))


@pytest.mark.parametrize(
    "options",
    [
        {"q_bits": 4, "q_group_size": 64},
        {"q_bits": 8, "q_group_size": 32},
        {"quant_predicate": "mixed_3_6"},
        {"q_mode": "mxfp4"},
        {"q_mode": "nvfp4"},
    ],
    ids=["int4-g64", "int8-g32", "mixed_3_6", "mxfp4", "nvfp4"],
)
def test_mlx_lm_quantized_checkpoint_loads_with_identical_logits(hf_checkpoint, tmp_path, options):
    ref, hf_path = hf_checkpoint
    out = tmp_path / "mlx"
    convert(str(hf_path), str(out), quantize=True, **options)

    ours = apertus_mlx.load_model(out)
    theirs, _ = mlx_lm_load_model(out)
    assert isinstance(ours.layers[0].mlp.up_proj, nn.QuantizedLinear)
    np.testing.assert_allclose(logits(ours), logits(theirs), rtol=0, atol=1e-5)
    if options.get("q_bits") == 8:  # near-lossless: still close to the reference
        assert max_rel_error(logits(ours), reference_logits(ref, IDS)) < 2e-2


def test_mixed_recipe_keeps_per_layer_bits(hf_checkpoint, tmp_path):
    _, hf_path = hf_checkpoint
    out = tmp_path / "mlx"
    convert(str(hf_path), str(out), quantize=True, quant_predicate="mixed_3_6")
    quant = json.loads((out / "config.json").read_text())["quantization"]
    model = apertus_mlx.load_model(out)
    per_layer = {k: v for k, v in quant.items() if isinstance(v, dict)}
    assert len({v["bits"] for v in per_layer.values()}) == 2  # the recipe mixes two widths
    for path, params in per_layer.items():
        module = dict(model.named_modules())[path]
        group_size = params["group_size"] or quant["group_size"]  # mlx-lm writes null for "the default"
        assert (module.bits, module.group_size) == (params["bits"], group_size), path


@pytest.mark.parametrize("schema", ["v4", "v5"])
def test_our_quantized_checkpoint_loads_in_mlx_lm(tmp_path, schema):
    ref = make_reference(hidden=128, intermediate=256, tie=True, seed=5)
    model = apertus_mlx.load_model(save_reference(ref, tmp_path / "hf", schema=schema))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())

    # A mixed layout: attention at 8 bits, the rest at 4.
    def eight_bit_attention(path, module):
        return hasattr(module, "to_quantized") and ({"group_size": 64, "bits": 8} if "self_attn" in path else True)

    nn.quantize(model, group_size=64, bits=4, class_predicate=eight_bit_attention)
    saved = apertus_mlx.save_model(tmp_path / "ours", model, config, copy_from=tmp_path / "hf")
    assert (saved / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".ours.partial-*"))

    reloaded = apertus_mlx.load_model(saved)
    theirs, _ = mlx_lm_load_model(saved)
    assert reloaded.layers[0].self_attn.q_proj.bits == 8
    assert reloaded.layers[0].mlp.up_proj.bits == 4
    np.testing.assert_array_equal(logits(reloaded), logits(model))
    np.testing.assert_allclose(logits(theirs), logits(model), rtol=0, atol=1e-5)
