"""Calibrated quantization methods (GPTQ, AWQ clipping, distilled scales) against round-to-nearest."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from quant_recipes import scaling
from quant_recipes.methods import METHODS, LinearStats, Target, awq, distill, gptq
from quant_recipes.methods.affine import pack_affine
from quant_recipes.recipe import Assignment

CALIBRATED = {"gptq": gptq.quantize, "awq": awq.quantize, "distill": distill.quantize}
OUT, IN, ROWS = 128, 512, 512


def layer(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A weight and per-channel input scales shaped like a trained transformer's.

    Heavy-tailed weights with a few outlier input columns; inputs whose channels differ in scale by
    orders of magnitude, with a handful of massive-activation channels.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, size=(OUT, IN)).astype(np.float32) * 0.02
    w[:, rng.choice(IN, 4, replace=False)] *= 4
    channel = np.exp(rng.normal(0, 0.7, IN)).astype(np.float32)
    channel[rng.choice(IN, 6, replace=False)] *= 15
    return w, channel


def inputs(channel: np.ndarray, seed: int) -> mx.array:
    """Inputs correlated through a low-rank component, as real activations are; `seed` picks the rows."""
    mixing = np.random.default_rng(0).normal(size=(32, IN)).astype(np.float32) / np.sqrt(32)
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(ROWS, 32)).astype(np.float32)
    noise = rng.normal(size=(ROWS, IN)).astype(np.float32)
    return mx.array((latent @ mixing + 0.5 * noise) * channel)


@pytest.fixture(scope="module")
def calibrated_layer() -> tuple[mx.array, LinearStats, mx.array]:
    """Weight, statistics over calibration inputs, and held-out inputs from the same distribution."""
    w, channel = layer()
    stats = LinearStats(IN)
    for seed in (1, 2):  # two batches, as the pipeline feeds them
        stats.update(inputs(channel, seed))
    return mx.array(w), stats, inputs(channel, seed=99)


def output_error(weight: mx.array, q, target: Target, x: mx.array) -> float:
    dequantized = mx.dequantize(q.weight, q.scales, q.biases, group_size=target.group_size, bits=target.bits)
    return mx.linalg.norm(x @ dequantized.T - x @ weight.T).item()


# Held-out error must be below these fractions of rtn's (measured at most 0.75 / 0.65 / 0.52 on this layer).
MARGIN = {"gptq": 0.85, "awq": 0.8, "distill": 0.65}
TARGETS = [Target(2, 64), Target(3, 64), Target(4, 64), Target(3, 32)]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"{t.bits}bit-g{t.group_size}")
@pytest.mark.parametrize("name", CALIBRATED)
def test_beats_rtn_on_held_out_inputs(calibrated_layer, name, target):
    weight, stats, held_out = calibrated_layer
    baseline = output_error(weight, METHODS["rtn"](weight, target, None), target, held_out)
    error = output_error(weight, CALIBRATED[name](weight, target, stats), target, held_out)
    assert error < MARGIN[name] * baseline, f"{name}: {error:.2f} vs rtn {baseline:.2f}"


def test_distill_improves_on_its_starting_codes(calibrated_layer):
    weight, stats, held_out = calibrated_layer
    target = Target(3, 64)
    start = output_error(weight, gptq.quantize(weight, target, stats), target, held_out)
    assert output_error(weight, distill.quantize(weight, target, stats), target, held_out) < 0.95 * start


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
@pytest.mark.parametrize("name", CALIBRATED)
def test_loads_into_quantized_linear(calibrated_layer, name, dtype):
    weight, stats, held_out = calibrated_layer
    target = Target(4, 64)
    weight = weight.astype(dtype)
    q = CALIBRATED[name](weight, target, stats)

    reference = mx.quantize(weight, group_size=target.group_size, bits=target.bits)
    for ours, theirs in zip((q.weight, q.scales, q.biases), reference, strict=True):
        assert (ours.shape, ours.dtype) == (theirs.shape, theirs.dtype)

    linear = nn.QuantizedLinear(IN, OUT, bias=False, group_size=target.group_size, bits=target.bits)
    linear.weight, linear.scales, linear.biases = q.weight, q.scales, q.biases
    x = held_out[:16].astype(dtype)
    dequantized = mx.dequantize(q.weight, q.scales, q.biases, group_size=target.group_size, bits=target.bits)
    expected = x.astype(mx.float32) @ dequantized.astype(mx.float32).T
    # MLX's own bfloat16 quantized matmul is ~2.5% off the float32 product (it is for `mx.quantize`'s
    # output too); a wrong layout or grid is off by ~100%.
    tolerance = 1e-5 if dtype == mx.float32 else 5e-2
    difference = mx.linalg.norm(linear(x).astype(mx.float32) - expected) / mx.linalg.norm(expected)
    assert difference.item() < tolerance


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_matches_mx_quantize(bits):
    """Codes recovered from `mx.quantize`'s output pack back to exactly its words."""
    w = mx.random.normal((8, 256), key=mx.random.key(bits))
    target = Target(bits, 32)
    words, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    dequantized = np.array(mx.dequantize(words, scales, biases, group_size=32, bits=bits))
    s, b = np.repeat(np.array(scales), 32, axis=1), np.repeat(np.array(biases), 32, axis=1)
    codes = np.rint((dequantized - b) / s)
    assert codes.min() == 0 and codes.max() == 2**bits - 1
    packed = pack_affine(codes, np.array(scales), np.array(biases), target, mx.float32)
    assert np.array_equal(np.array(packed.weight), np.array(words))


def test_gptq_tolerates_dead_inputs(calibrated_layer):
    """Input channels that never fire have a zero Hessian row; the rest must still be quantized well."""
    weight, _, held_out = calibrated_layer
    _, channel = layer()
    channel[:40] = 0.0
    stats = LinearStats(IN)
    stats.update(inputs(channel, seed=1))
    target = Target(3, 64)
    live = held_out * mx.array(channel > 0)
    q = gptq.quantize(weight, target, stats)
    assert mx.all(mx.isfinite(q.scales)).item() and mx.all(mx.isfinite(q.biases)).item()
    baseline = output_error(weight, METHODS["rtn"](weight, target, None), target, live)
    assert output_error(weight, q, target, live) < 0.9 * baseline


@pytest.mark.parametrize("name", CALIBRATED)
def test_needs_calibration(name):
    weight = mx.zeros((OUT, IN))
    with pytest.raises(ValueError, match="calibration"):
        CALIBRATED[name](weight, Target(4, 64), None)
    with pytest.raises(ValueError, match="calibration"):
        CALIBRATED[name](weight, Target(4, 64), LinearStats(IN))  # collected nothing


@pytest.mark.parametrize("name", CALIBRATED)
def test_registered(name):
    assert METHODS[name] is CALIBRATED[name]


@pytest.mark.parametrize("name", CALIBRATED)
def test_float_modes_fall_back_to_rtn(calibrated_layer, name):
    weight, stats, _ = calibrated_layer
    target = Target(4, 32, "mxfp4")
    ours, theirs = CALIBRATED[name](weight, target, stats), METHODS["rtn"](weight, target, None)
    assert np.array_equal(np.array(ours.weight), np.array(theirs.weight))
    assert np.array_equal(np.array(ours.scales), np.array(theirs.scales))


def test_activation_aware_scale_beats_plain_rounding_on_held_out_inputs(calibrated_layer):
    weight, stats, held_out = calibrated_layer
    assignment = Assignment(3, 64, "affine", "awq")
    s = scaling.search_scale(stats.sample, [weight], [assignment])
    plain = scaling.rounding_error(held_out, weight, mx.ones_like(s), assignment)
    assert scaling.rounding_error(held_out, weight, s, assignment) < 0.8 * plain
    assert not mx.allclose(s, mx.ones_like(s)).item()  # the search moved away from a = 0


def test_rescaled_statistics_equal_those_of_rescaled_inputs():
    x = mx.array(np.random.default_rng(0).normal(size=(2, 40, 16)).astype(np.float32))
    factor = mx.array(np.linspace(0.5, 2.0, 16).astype(np.float32))
    stats, direct = LinearStats(16), LinearStats(16)
    stats.update(x)
    stats.rescale(factor)
    direct.update(x * factor)
    for a, b in ((stats.hessian, direct.hessian), (stats.abs_mean, direct.abs_mean), (stats.sample, direct.sample)):
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-5).item()


def test_folding_scales_into_the_norm_keeps_the_layer_exact():
    from apertus_mlx.model import DecoderLayer, ModelArgs

    args = ModelArgs.from_config(
        {"model_type": "apertus", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1}
        | {"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "rope_theta": 1e4}
    )
    block = DecoderLayer(args)
    x = mx.array(np.random.default_rng(1).normal(size=(2, 24, 128)).astype(np.float32))
    # Trained norms are not all ones, and a few channels carry most of the activation.
    block.attention_layernorm.weight = mx.array(np.exp(np.random.default_rng(2).normal(0, 1, 128)).astype(np.float32))
    before = block(x, "causal", None)
    prefix = "model.layers.0"
    paths = [f"{prefix}.{n}" for names in scaling.GROUPS.values() for n in names]
    plan = {p: Assignment(3, 64, "affine", "awq") for p in paths}
    channel = mx.array(np.exp(np.random.default_rng(3).normal(0, 1.5, 128)).astype(np.float32))
    stats = {p: LinearStats(128) for p in paths}
    for p in stats.values():
        p.update(x * channel)  # calibration inputs with channel structure, so the search picks real scales
    gain = block.attention_layernorm.weight
    scaling.scale_layer(block, prefix, plan, stats)
    assert not mx.allclose(block.attention_layernorm.weight, gain).item()
    assert mx.allclose(block(x, "causal", None), before, rtol=1e-4, atol=1e-4).item()
