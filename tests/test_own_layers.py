"""Our own quantized layer types (a low-rank side path, a tensor-scaled NVFP4) survive save_model -> load_model."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_unflatten

from apertus_mlx.errors import ConfigError
from apertus_mlx.load import DEMO_MODEL, load_model
from apertus_mlx.lowrank import CastQuantizedLinear, LowRankQuantizedLinear, quantized_linear
from apertus_mlx.save import save_model
from apertus_mlx.scaled_linear import ScaledQuantizedLinear

UP, OUT = "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = load_model(DEMO_MODEL)
    model.set_dtype(mx.float32)
    nn.quantize(model, group_size=64, bits=4)
    up = model.layers[0].mlp.up_proj
    key = mx.random.key(3)
    side = LowRankQuantizedLinear.from_quantized(
        up, 0.01 * mx.random.normal((8, 256), key=key), 0.01 * mx.random.normal((768, 8), key=key)
    )
    scaled = ScaledQuantizedLinear(256, 256)
    weight = mx.random.normal((256, 256), key=key)
    scaled.weight, scaled.scales = mx.quantize(weight, group_size=16, bits=4, mode="nvfp4")
    scaled.tensor_scale = mx.array(0.5)
    model.update_modules(tree_unflatten([(UP, side), (OUT, scaled)]))
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    out = save_model(tmp_path_factory.mktemp("own") / "model", model, config, copy_from=DEMO_MODEL)
    return model, out


def test_saved_and_loaded_with_the_same_logits(saved):
    model, path = saved
    quant = json.loads((path / "config.json").read_text())["quantization"]
    assert quant[UP] == {"group_size": 64, "bits": 4, "mode": "affine", "low_rank": 8}
    assert quant[OUT] == {"group_size": 16, "bits": 4, "mode": "nvfp4", "tensor_scale": True}
    loaded = load_model(path)
    assert isinstance(loaded.layers[0].mlp.up_proj, LowRankQuantizedLinear)
    assert isinstance(loaded.layers[1].self_attn.o_proj, ScaledQuantizedLinear)
    ids = mx.array([[1, 5, 9, 33, 70]])
    assert mx.array_equal(loaded(ids), model(ids)).item()


def test_an_entry_naming_no_linear_layer_is_refused(saved, tmp_path):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["quantization"]["model.norm"] = {"group_size": 64, "bits": 4, "low_rank": 8}
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).symlink_to(path / name)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"^config.json: quantization names model.norm, which is not a linear layer"):
        load_model(tmp_path)


def test_exact_float32_scales_come_back_with_the_cast_to_the_activations_dtype(tmp_path):
    model = load_model(DEMO_MODEL)  # bfloat16
    v = model.layers[2].self_attn.v_proj
    weight, scales, biases = mx.quantize(v.weight.astype(mx.float32), group_size=64, bits=4)
    exact = quantized_linear(weight, scales, biases, 64, 4)
    model.update_modules(tree_unflatten([("model.layers.2.self_attn.v_proj", exact)]))
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    loaded = load_model(save_model(tmp_path / "cast", model, config, copy_from=DEMO_MODEL))
    layer = loaded.layers[2].self_attn.v_proj
    assert isinstance(layer, CastQuantizedLinear) and layer.scales.dtype == mx.float32
    ids = mx.array([[1, 5, 9, 33, 70]])
    out = loaded(ids)
    assert out.dtype == mx.bfloat16  # not promoted to float32 by the wider scales
    assert mx.array_equal(out, model(ids)).item()
