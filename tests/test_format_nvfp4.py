"""NVFP4 (ModelOpt and compressed-tensors layouts): exact layers, logits and chats equal to the dequantized model."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import apertus_mlx
from apertus_mlx import ApertusError, ChatSession, SamplingOptions
from apertus_mlx.formats import detect, nvfp4
from apertus_mlx.scaled_linear import ScaledQuantizedLinear

from checkpoints import make_reference, max_rel_error, save_reference, silence_special_tokens
from nvfp4_fixtures import (
    dequantize,
    e4m3_decode,
    quantize,
    unpack,
    write_compressed_tensors,
    write_dequantized,
    write_modelopt,
)

GREEDY = SamplingOptions(max_tokens=16, temperature=0.0)
IDS = mx.array([[5, 60, 61, 200, 17, 300, 42, 99, 7, 250]])
CT_BOUND = 2.0**-23  # relative: 1/global rounds to float32 once, the product once more


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    model = silence_special_tokens(make_reference(seed=5, hidden=64, intermediate=160))
    return save_reference(model, tmp_path_factory.mktemp("nvfp4") / "float")


@pytest.fixture(scope="module", params=["modelopt", "compressed-tensors"])
def published(request, source):
    """(NVFP4 dir, its dequantized float twin, each layer's weight by the format's formula, layout)."""
    root = source.parent / request.param
    write = write_modelopt if request.param == "modelopt" else write_compressed_tensors
    refs = write(source, root / "nvfp4")
    return root / "nvfp4", write_dequantized(source, root / "float", refs), refs, request.param


def dequantized(layer: ScaledQuantizedLinear) -> np.ndarray:
    w = mx.dequantize(layer.weight, layer.scales, group_size=16, bits=4, mode="nvfp4", dtype=mx.float32)
    return np.array(w * layer.tensor_scale)


def test_mlx_nvfp4_words_are_the_published_bytes():
    w = mx.random.normal((8, 64), key=mx.random.key(0))
    words, scales = mx.quantize(w, group_size=16, bits=4, mode="nvfp4")
    ours = unpack(np.array(words).view(np.uint8)) * np.repeat(e4m3_decode(np.array(scales)), 16, axis=1)
    assert np.array_equal(
        ours, np.array(mx.dequantize(words, scales, group_size=16, bits=4, mode="nvfp4", dtype=mx.float32))
    )

    codes, scale_bytes, _ = quantize(np.array(w))
    back = mx.dequantize(
        mx.array(codes).view(mx.uint32), mx.array(scale_bytes), group_size=16, bits=4, mode="nvfp4", dtype=mx.float32
    )
    assert np.array_equal(np.array(back, np.float64), dequantize(codes, scale_bytes, 1.0))


def test_layer_matmul_float16_does_not_overflow_and_params_round_trip(tmp_path):
    codes = np.full((32, 32), 0x77, np.uint8)  # every weight +6 times the largest scale: 2688 before scaling
    layer = ScaledQuantizedLinear.empty(64, 32, {"group_size": 16, "bits": 4, "mode": "nvfp4", "tensor_scale": True})
    layer.weight = mx.array(codes).view(mx.uint32)
    layer.scales = mx.full((32, 4), 0x7E, mx.uint8)  # 448
    layer.tensor_scale = mx.array(1 / 2688, mx.float32)
    x = mx.full((2, 64), 100.0, mx.float16)
    y = layer(x)
    assert y.dtype == mx.float16
    assert np.allclose(np.array(y, np.float32), 6400.0, rtol=1e-3)  # the unscaled sum would be 17 million
    assert layer.quant_params() == {"group_size": 16, "bits": 4, "mode": "nvfp4", "tensor_scale": True}

    mx.save_safetensors(str(tmp_path / "l.safetensors"), dict(layer.parameters()))
    again = ScaledQuantizedLinear.empty(64, 32, layer.quant_params())
    again.load_weights(str(tmp_path / "l.safetensors"))
    assert mx.array_equal(again(x), y)
    with pytest.raises(ValueError):
        ScaledQuantizedLinear.empty(64, 32, {"group_size": 32, "bits": 4, "mode": "mxfp4"})


def test_layers_equal_the_formula(published):
    path, _, refs, layout = published
    assert detect(path) == "nvfp4"
    model, summary = nvfp4.load_model(path)
    layers = dict(model.named_modules())
    for name, ref in refs.items():
        layer = layers[name]
        assert isinstance(layer, ScaledQuantizedLinear)
        ours = dequantized(layer)
        if layout == "modelopt":  # e2m1·scale is exact in float32: one rounding, as the float64 product's
            assert np.array_equal(ours, ref.astype(np.float32)), name
        else:
            assert np.all(np.abs(ours - ref) <= CT_BOUND * np.abs(ref)), name
        x = mx.random.normal((3, ref.shape[1]), key=mx.random.key(1))
        assert max_rel_error(np.array(layer(x)), np.array(x, np.float64) @ ref.T) < 1e-6
    assert type(layers["lm_head"]) is nn.Linear
    assert summary.modules["NVFP4 g16 E4M3 + tensor scale"] == sum(r.size for r in refs.values())
    assert summary.format == ("NVFP4 (ModelOpt, weight-only)" if layout == "modelopt" else "NVFP4 (compressed-tensors)")
    assert any("lm_head" in note for note in summary.notes)


def test_logits_and_greedy_chat_equal_the_dequantized_model(published):
    path, twin, _, _ = published
    model, tokenizer = apertus_mlx.load(path)
    float_model, float_tokenizer = apertus_mlx.load(twin)
    assert max_rel_error(np.array(model(IDS)), np.array(float_model(IDS))) < 1e-5
    ours = ChatSession(model, tokenizer, options=GREEDY).generate("Grüezi! Wie gaht's?")
    theirs = ChatSession(float_model, float_tokenizer, options=GREEDY).generate("Grüezi! Wie gaht's?")
    assert ours == theirs and len(tokenizer.encode(ours)) >= 8


def test_weight_only_exports_with_input_scales_and_old_algo_name_load(source, tmp_path):
    refs = write_modelopt(source, tmp_path / "w4a16", input_scale=True)  # W4A16_NVFP4 may carry unused ones
    model, _ = nvfp4.load_model(tmp_path / "w4a16")
    name = next(iter(refs))
    assert np.array_equal(dequantized(dict(model.named_modules())[name]), refs[name].astype(np.float32))
    write_modelopt(source, tmp_path / "old", algo="NVFP4")  # ModelOpt < 0.4x: weight-only also says NVFP4
    assert nvfp4.load_model(tmp_path / "old")[0] is not None


def test_bf16_checkpoint_runs_in_bf16(tmp_path):
    model = make_reference(seed=6, hidden=64, intermediate=160)
    source = save_reference(model, tmp_path / "float", dtype=torch.bfloat16)
    refs = write_modelopt(source, tmp_path / "nvfp4")
    nvfp4_model, _ = apertus_mlx.load(tmp_path / "nvfp4")
    float_model, _ = apertus_mlx.load(write_dequantized(source, tmp_path / "twin", refs))
    logits = nvfp4_model(IDS)
    assert logits.dtype == mx.bfloat16
    assert max_rel_error(np.array(logits.astype(mx.float32)), np.array(float_model(IDS).astype(mx.float32))) < 2e-2


def _one_line_error(path, *fragments):
    with pytest.raises(ApertusError) as error:
        apertus_mlx.load_model(path)
    message = str(error.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_w4a4_is_refused(source, tmp_path):
    write_modelopt(source, tmp_path / "mo", algo="NVFP4", input_scale=True)
    _one_line_error(tmp_path / "mo", "input_scale", "W4A4")
    write_compressed_tensors(source, tmp_path / "ct", input_activations=True)
    _one_line_error(tmp_path / "ct", "input_activations", "W4A4")


def test_unknown_algo_group_size_and_shapes_are_refused(source, tmp_path):
    write_modelopt(source, tmp_path / "fp8", algo="FP8")
    _one_line_error(tmp_path / "fp8", "hf_quant_config.json", "quant_algo 'FP8'")

    refs = write_modelopt(source, tmp_path / "mixed")
    config = json.loads((tmp_path / "mixed" / "hf_quant_config.json").read_text())
    config["quantization"].update(
        quant_algo="MIXED_PRECISION", quantized_layers={name: {"quant_algo": "W4A16_NVFP4"} for name in refs}
    )
    (tmp_path / "mixed" / "hf_quant_config.json").write_text(json.dumps(config))
    assert nvfp4.load_model(tmp_path / "mixed")[1].parameters > 0
    config["quantization"]["quantized_layers"]["model.layers.0.self_attn.q_proj"] = {"quant_algo": "FP8"}
    (tmp_path / "mixed" / "hf_quant_config.json").write_text(json.dumps(config))
    _one_line_error(tmp_path / "mixed", "quantized_layers.model.layers.0.self_attn.q_proj.quant_algo 'FP8'")

    write_modelopt(source, tmp_path / "g32")
    config = json.loads((tmp_path / "g32" / "hf_quant_config.json").read_text())
    config["quantization"]["group_size"] = 32
    (tmp_path / "g32" / "hf_quant_config.json").write_text(json.dumps(config))
    _one_line_error(tmp_path / "g32", "group_size 32")

    write_compressed_tensors(source, tmp_path / "cut")
    tensors = load_file(tmp_path / "cut" / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight_scale"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, tmp_path / "cut" / "model.safetensors")
    _one_line_error(tmp_path / "cut", key, "shape (64, 9)", "(64, 10)")


def test_plain_checkpoints_are_not_nvfp4(source):
    assert not nvfp4.matches(source)
    assert nvfp4.load_tokenizer(source) is None
