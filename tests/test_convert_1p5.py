"""Converting a full Apertus 1.5 checkpoint: recipes quantize its decoder, its vision tokenizer stays as it was.

The source is test_vision.py's tiny `Apertus1p5ForConditionalGeneration` (decoder under `model.language_model.*`,
a 512-row embedding and a 384-row head, a vision tokenizer under `model.vision_tokenizer.*`). Its MLP is 160 wide,
so groups are 32.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import apertus_mlx
from apertus_mlx.vision import ImageTokenizer
from quant_recipes import pipeline
from quant_recipes.calibration import default_texts, token_sequences
from quant_recipes.convert import convert
from quant_recipes.recipe import load_recipe, parse_recipe

from test_vision import CODEBOOK, OUTPUT_VOCAB, SIZE, VOCAB, make_reference, picture, save_tokenizer

MEDIA = ("model.vision_tokenizer.", "model.audio_tokenizer.")
# KL divergence (nats/token) of the report on this random model; measured 0.012 (int4-g32) and 0.043 (budget at
# 4 bits per weight, 2-4 bits chosen per module), so these bounds leave room for other BLAS and MLX versions
# while still failing if a module were left at random or the head got the wrong rows.
KL_BOUND = {"int4-g32": 0.05, "budget": 0.15}
BUDGET = {"bits_per_weight": 4.0, "choices": [2, 3, 4, 6], "group_sizes": [32]}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("convert-1p5") / "src"
    make_reference().save_pretrained(path)
    save_tokenizer(path)
    (path / "processor_config.json").write_text(json.dumps({"image_processor": {"size": SIZE, "spatial_factor": 16}}))
    return path


@pytest.fixture(scope="module", params=["int4-g32", "budget"])
def converted(request, source, tmp_path_factory):
    if request.param == "budget":
        recipe = parse_recipe({"name": "budget", "bits": 4, "group_size": 32, "budget": BUDGET})
    else:
        recipe = load_recipe(request.param)
    out = tmp_path_factory.mktemp("converted") / request.param
    return request.param, out, convert(source, recipe, out, eval_sequences=4)


def tensors(path) -> dict[str, mx.array]:
    found = {}
    for file in sorted(path.glob("*.safetensors")):
        found.update(mx.load(str(file)))
    return found


def test_every_decoder_module_is_quantized_and_the_split_vocabulary_kept(converted):
    name, out, report = converted
    model, _ = apertus_mlx.load(out)
    quantized = {p: m for p, m in model.named_modules() if hasattr(m, "bits")}
    linears = [f"model.language_model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"
    )]  # fmt: skip
    assert set(quantized) == {*linears, "model.language_model.embed_tokens", "lm_head"}
    assert sum(report["layers"].values()) == len(quantized) == 14
    embed, head = quantized["model.language_model.embed_tokens"], quantized["lm_head"]
    # Two tensors, each quantized on its own: the embedding has every input id, the head the text ids only.
    assert isinstance(embed, nn.QuantizedEmbedding) and isinstance(head, nn.QuantizedLinear)
    assert embed.scales.shape == (VOCAB, 64 // embed.group_size)
    assert head.scales.shape == (OUTPUT_VOCAB, 64 // head.group_size)
    assert model.args.input_vocab_size == VOCAB and model.args.vocab_size == OUTPUT_VOCAB
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "apertus1p5" and config["quantization_recipe"]["name"] == name
    assert (config["text_config"]["vocab_size"], config["text_config"]["output_vocab_size"]) == (VOCAB, OUTPUT_VOCAB)
    if name == "int4-g32":
        assert {(m.bits, m.group_size) for m in quantized.values()} == {(4, 32)}
    else:
        assert report["bits_per_weight"] <= BUDGET["bits_per_weight"]
        assert report["bits_per_weight"] == pytest.approx(BUDGET["bits_per_weight"], rel=0.05)
        assert len({m.bits for m in quantized.values()}) > 1


def test_media_tokenizers_are_copied_byte_for_byte(source, converted):
    _, out, _ = converted
    original, saved = tensors(source), tensors(out)
    media = {k for k in original if k.startswith(MEDIA)}
    assert any(k.startswith("model.vision_tokenizer.") for k in media)
    assert {k for k in saved if k.startswith(MEDIA)} == media
    for key in media:
        assert saved[key].dtype == original[key].dtype == mx.float32, key
        assert np.array(saved[key]).tobytes() == np.array(original[key]).tobytes(), key
    assert (out / "processor_config.json").read_text() == (source / "processor_config.json").read_text()


def test_an_image_encodes_to_the_same_codes(source, converted):
    _, out, _ = converted
    before, after = ImageTokenizer.from_pretrained(source), ImageTokenizer.from_pretrained(out)
    assert after.settings == before.settings
    image = picture(45, 70, seed=7)
    codes = after.codes(image)
    np.testing.assert_array_equal(codes, before.codes(image))
    assert len(set(codes.ravel().tolist())) > 1
    assert after.image_token_ids(image) == before.image_token_ids(image)
    assert all(OUTPUT_VOCAB <= c + after.offset < OUTPUT_VOCAB + CODEBOOK for c in codes.ravel().tolist())


def test_report_is_the_quality_of_the_loaded_output(source, converted):
    name, out, report = converted
    original = apertus_mlx.load_model(source)
    original.set_dtype(mx.bfloat16)  # the report's reference is the bf16 model
    quantized, tokenizer = apertus_mlx.load(out)
    tokens = token_sequences(tokenizer, default_texts()[1], 4, 256, "evaluation")
    lp = np.array(nn.log_softmax(original(tokens).astype(mx.float32), axis=-1))[:, :-1]
    lq = np.array(nn.log_softmax(quantized(tokens).astype(mx.float32), axis=-1))[:, :-1]
    assert lp.shape[-1] == OUTPUT_VOCAB
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    assert report["kl_divergence"] == pytest.approx(kl, rel=2e-3)
    assert 0 < report["kl_divergence"] < KL_BOUND[name]
    assert report["top1_agreement"] == pytest.approx((lp.argmax(-1) == lq.argmax(-1)).mean(), abs=2e-3)
    assert json.loads((out / "quality.json").read_text()) == report
    assert "KL divergence" in (out / "QUALITY.md").read_text()


def test_recipe_rules_see_the_decoder_as_apertus_1s(source):
    # `model.layers.*` rules with layer ranges reach the 1.5 decoder, which the model holds as model.language_model.
    model = apertus_mlx.load_model(source, lazy=True)
    plan = {p: load_recipe("apertus-mixed-3").assign(p, 2) for p in pipeline.quantizable_modules(model)}
    assert len(plan) == 14 and {"model.embed_tokens", "lm_head", "model.layers.1.mlp.up_proj"} <= set(plan)
    assert plan["model.layers.1.mlp.up_proj"].bits == 5  # the first and last two layers are kept wider
    assert plan["model.embed_tokens"].bits == plan["lm_head"].bits == 6
    assert pipeline.module_path(model, "model.layers.1.mlp.up_proj") == "model.language_model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("method", ["gptq", "distill"])
def test_calibrated_methods_convert_the_decoder(source, tmp_path, method):
    recipe = parse_recipe({"name": method, "bits": 4, "group_size": 32, "method": method})
    report = convert(source, recipe, tmp_path / method, eval_sequences=4)
    assert report["layers"] == {"4-bit g32": 14}
    assert 0 < report["kl_divergence"] < KL_BOUND["int4-g32"]
    assert ImageTokenizer.from_pretrained(tmp_path / method).codes(picture(40, 40, seed=1)).shape == (2, 2)
