"""Parity of our MLX port with transformers' ApertusForCausalLM, and incremental decoding."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

import apertus_mlx

from checkpoints import make_reference, max_rel_error, reference_logits, save_reference


def our_logits(model, ids: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(ids)).astype(mx.float32))


@pytest.mark.parametrize("schema", ["v4", "v5"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied-8B-like", "tied-v1.1-like"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["gqa1", "gqa2", "gqa4"])
def test_logits_match_reference(tmp_path, schema, tie, kv_heads):
    ref = make_reference(tie=tie, kv_heads=kv_heads, seed=kv_heads)
    path = save_reference(ref, tmp_path / "ckpt", schema=schema)
    if tie:
        assert "lm_head.weight" not in mx.load(str(path / "model.safetensors"))
    model = apertus_mlx.load_model(path)
    assert ("lm_head" in model) is not tie

    ids = np.random.default_rng(0).integers(0, 384, size=(2, 24))
    ref_logits = reference_logits(ref, ids)
    ours = our_logits(model, ids)
    assert ours.shape == (2, 24, 384)
    assert max_rel_error(ours, ref_logits) <= 1e-4


def test_config_schemas_give_same_model(tmp_path):
    ref = make_reference()
    v4 = apertus_mlx.load_model(save_reference(ref, tmp_path / "v4", schema="v4"))
    v5 = apertus_mlx.load_model(save_reference(ref, tmp_path / "v5", schema="v5"))
    assert "rope_parameters" in json.loads((tmp_path / "v5/config.json").read_text())
    assert v4.args.rope_scaling == v5.args.rope_scaling
    assert v4.args.rope_theta == v5.args.rope_theta == 12_000_000.0
    ids = np.arange(20).reshape(1, 20)
    np.testing.assert_array_equal(our_logits(v4, ids), our_logits(v5, ids))


def test_positions_beyond_original_context(tmp_path):
    # llama3 RoPE scaling matters past the original 8192 positions: run a sequence that reaches 8300.
    ref = make_reference(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, seed=7)
    model = apertus_mlx.load_model(save_reference(ref, tmp_path / "ckpt"))
    ids = np.random.default_rng(1).integers(0, 384, size=(1, 8300))
    ref_logits = reference_logits(ref, ids)
    ours = our_logits(model, ids)
    assert max_rel_error(ours[:, 8100:], ref_logits[:, 8100:]) <= 1e-4
    assert max_rel_error(ours, ref_logits) <= 1e-4


def test_explicit_head_dim(tmp_path):
    ref = make_reference(hidden=64, heads=4, kv_heads=2, head_dim=32)
    model = apertus_mlx.load_model(save_reference(ref, tmp_path / "ckpt"))
    assert model.args.head_dim == 32
    ids = np.arange(12).reshape(1, 12)
    assert max_rel_error(our_logits(model, ids), reference_logits(ref, ids)) <= 1e-4


def test_bfloat16_checkpoint_loads_in_bfloat16(tmp_path):
    ref = make_reference(seed=3)
    model = apertus_mlx.load_model(save_reference(ref, tmp_path / "ckpt", dtype=torch.bfloat16))
    assert model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    ids = np.arange(16).reshape(1, 16)
    ref_bf16 = reference_logits(ref.to(torch.bfloat16), ids)
    assert max_rel_error(our_logits(model, ids), ref_bf16) <= 3e-2


@pytest.mark.parametrize("tie", [False, True])
def test_incremental_decoding_equals_full_forward(tmp_path, tie):
    model = apertus_mlx.load_model(save_reference(make_reference(tie=tie), tmp_path / "ckpt"))
    ids = np.random.default_rng(2).integers(0, 384, size=(1, 20))
    full = our_logits(model, ids)

    cache = apertus_mlx.make_cache(model)
    steps = [our_logits_cached(model, ids[:, :12], cache)]  # prefill
    steps += [our_logits_cached(model, ids[:, i : i + 1], cache) for i in range(12, 16)]  # one token at a time
    steps.append(our_logits_cached(model, ids[:, 16:], cache))  # a chunk after decoding
    incremental = np.concatenate(steps, axis=1)
    assert cache[0].offset == 20
    np.testing.assert_allclose(incremental, full, rtol=0, atol=1e-4 * np.abs(full).max())


def our_logits_cached(model, ids, cache):
    return np.array(model(mx.array(ids), cache=cache))
