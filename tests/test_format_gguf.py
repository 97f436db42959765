"""GGUF: ggml blocks against gguf-py's dequantization, tiny Apertus models against their HF source, the
metadata tokenizer against the HF one, a chat on a lone .gguf file, llama.cpp's own conversion, refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

import apertus_mlx
from apertus_mlx.errors import CheckpointError, ConfigError, ModelNotFoundError
from apertus_mlx.formats import gguf, gguf_tensors
from apertus_mlx.formats.gguf_tensors import Converter
from apertus_mlx.load import load_tokenizer
from apertus_mlx.model import rope_periods
from bench.yardstick.tokenizer import SPECIAL_TOKENS

from checkpoints import (
    CHAT_TEMPLATE,
    LLAMA3_ROPE,
    make_reference,
    max_rel_error,
    reference_logits,
    save_reference,
    silence_special_tokens,
)
from gguf_fixtures import add_tokenizer, gguf_name, random_blocks, write_model

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "apertus_mlx" / "demo_model"
LLAMA_CPP_DEMO = REPO / "tests" / "fixtures" / "demo-bf16.gguf"
EXACT = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K]
GROUP16 = [T.Q6_K, T.Q3_K, T.Q2_K]
IDS = np.array([[1, 5, 20, 100, 200, 300, 17, 42, 250, 7]])
SHAPE = {"hidden": 256, "intermediate": 512}  # K-quants need rows of 256 weights
# Every exactly-mapped type in one model, the embedding included.
EXACT_MIX = {
    "token_embd.weight": T.Q4_K,
    "blk.0.attn_q.weight": T.Q8_0,
    "blk.0.attn_k.weight": T.Q4_0,
    "blk.0.attn_v.weight": T.Q4_1,
    "blk.0.attn_output.weight": T.Q5_0,
    "blk.0.ffn_up.weight": T.Q5_1,
    "blk.0.ffn_down.weight": T.Q5_K,
    "blk.1.attn_q.weight": T.Q4_K,
    "output.weight": T.Q8_0,
}
# What a Q4_K_M file holds, plus the other two group-16 types.
K_MIX = {
    "token_embd.weight": T.Q4_K,
    "blk.0.attn_v.weight": T.Q6_K,
    "blk.0.ffn_down.weight": T.Q6_K,
    "blk.1.ffn_up.weight": T.Q3_K,
    "blk.1.ffn_down.weight": T.Q2_K,
    "output.weight": T.Q6_K,
}
for _i in range(2):
    for _n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down"):
        K_MIX.setdefault(f"blk.{_i}.{_n}.weight", T.Q4_K)


def _logits(model, ids=IDS) -> np.ndarray:
    return np.array(model(mx.array(ids)).astype(mx.float32))


def _one_tensor_file(path: Path, qtype: T, rows: int = 8, cols: int = 512) -> Path:
    writer = GGUFWriter(path, "apertus")
    if qtype in (T.F32, T.F16):
        data = (
            np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32 if qtype == T.F32 else np.float16)
        )
        writer.add_tensor("w", data)
    elif qtype == T.BF16:
        data = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
        writer.add_tensor("w", (data.view(np.uint32) >> 16).astype(np.uint16), raw_dtype=T.BF16)
    else:
        writer.add_tensor("w", random_blocks(qtype, rows, cols, seed=int(qtype)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("qtype", EXACT + GROUP16 + [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_each_type_matches_gguf_py_dequantization(tmp_path, qtype, monkeypatch):
    monkeypatch.setattr(gguf_tensors, "CHUNK", 1024)  # two rows at a time: the pieces join in order
    tensor = GGUFReader(_one_tensor_file(tmp_path / "t.gguf", qtype)).tensors[0]
    ref = dequantize(tensor.data, qtype).reshape(8, 512)
    convert = Converter("t.gguf")
    arrays, settings = convert(tensor)
    if settings is None:
        assert np.array_equal(np.array(arrays["weight"].astype(mx.float32)), ref)
        return
    scales, biases = arrays["scales"], arrays["biases"]
    # Stored scales in their own dtype, then widened: the exact types lose nothing to the dtype.
    ours = mx.dequantize(arrays["weight"], scales.astype(mx.float32), biases.astype(mx.float32), **settings)
    ours = np.array(ours)
    if qtype in EXACT:
        assert settings == {
            "group_size": 32,
            "bits": {T.Q8_0: 8, T.Q5_0: 5, T.Q5_1: 5, T.Q5_K: 5}.get(qtype, 4),
            "mode": "affine",
        }
        assert np.array_equal(ours, ref)
    else:  # re-quantized: the documented bound, under 0.3x the type's own rounding error
        rel = np.sqrt(np.mean((ours - ref) ** 2) / np.mean(ref**2))
        assert 0 < rel < 0.05
        assert f"{qtype.name} re-quantized" in convert.notes()[0] and "own rounding" in convert.notes()[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (torch reference, HF dir, GGUF file); each GGUF is its torch model's exact weights."""
    out = {}
    root = tmp_path_factory.mktemp("gguf")
    for name, types, dtype in [
        ("f32", T.F32, None),
        ("bf16", T.BF16, torch.bfloat16),
        ("exact", EXACT_MIX, None),
        ("k_mix", K_MIX, None),
    ]:
        ref = make_reference(**SHAPE, seed=len(out))
        hf = save_reference(ref, root / name / "hf", dtype=dtype)  # bf16: the model keeps the rounded values
        file = write_model(ref, root / name / "lone" / f"tiny-{name}.gguf", types, hf)
        save_reference(ref, hf, dtype=dtype)  # now with the dequantized blocks as weights
        out[name] = (ref, hf, file)
    return out


@pytest.mark.parametrize("name", ["f32", "bf16", "exact"])
def test_logits_equal_the_source(models, name):
    ref, hf, file = models[name]
    model = apertus_mlx.load_model(file)
    ours = _logits(model)
    if name == "bf16":  # F32 norms fit bf16 exactly, so they run in bf16 as the source's do: same logits
        assert np.array_equal(ours, _logits(apertus_mlx.load_model(hf)))
        return
    assert max_rel_error(ours, _logits(apertus_mlx.load_model(hf))) < 2e-5
    assert max_rel_error(ours, reference_logits(ref, IDS)) < 2e-5


def test_group16_types_are_requantized_with_measured_error(models, monkeypatch):
    ref, _, file = models["k_mix"]
    model = apertus_mlx.load_model(file)
    summary = model.import_summary
    assert summary.format == "GGUF Q4_K"  # no general.file_type: the commonest 2-D type
    assert set(summary.modules) == {
        "F32 float",
        "Q4_K -> affine 4-bit g32",
        "Q6_K -> affine 8-bit g32 (re-quantized)",
        "Q3_K -> affine 5-bit g32 (re-quantized)",
        "Q2_K -> affine 4-bit g32 (re-quantized)",
    }
    assert [n.split()[0] for n in summary.notes] == ["Q2_K", "Q3_K", "Q6_K"]
    expected = reference_logits(ref, IDS)
    assert max_rel_error(_logits(model), expected) < 0.03
    monkeypatch.setenv("APERTUS_GGUF_GROUP16", "float16")
    exactish = apertus_mlx.load_model(file)
    assert "Q6_K -> float16 (dequantized)" in exactish.import_summary.modules
    assert max_rel_error(_logits(exactish), expected) < 1e-3


def test_rope_freqs_give_the_llama3_periods(models):
    model = apertus_mlx.load_model(models["f32"][2])
    expected = np.array(rope_periods(64, LLAMA3_ROPE["rope_theta"], LLAMA3_ROPE))
    assert np.allclose(np.array(model.layers[0].self_attn._periods), expected, rtol=1e-6)


@pytest.mark.parametrize("source", [DEMO, REPO / "bench" / "yardstick" / "models" / "small"], ids=["demo", "small"])
def test_metadata_tokenizer_encodes_as_the_source(tmp_path, source):
    writer = GGUFWriter(tmp_path / "tok.gguf", "apertus")
    add_tokenizer(writer, source)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours, theirs = gguf.load_tokenizer(tmp_path / "tok.gguf"), load_tokenizer(source)
    texts = [
        "Grüezi mitenand. Ça va très bien; nevica a Lugano. 日本語のテキスト。",
        "Emoji: 🇨🇭🧀⛰️ 👩‍👩‍👧 and code:\ndef main():\n    return 0\n\t  x = 12345 + 3.14",
        "<|user_start|>Hi<|user_end|><|assistant_start|>",
    ]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text)
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))
    chat = [{"role": "user", "content": "Hallo!"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == theirs.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert ours.eos_token_ids == theirs.eos_token_ids


# The split rules of Apertus' own tokenizer (Mistral's "tekken"), as its tokenizer.json states them.
TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def test_tekken_split_rules_encode_as_the_source(tmp_path):
    tok = Tokenizer(BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(TEKKEN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = ["Grüezi mitenand! HelloWorld CamelCase 2025-11-30, dé-jà vu: ÇA VA. 日本語 🇨🇭 x/y/z\n\n  def f():"] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(tmp_path / "hf")
    writer = GGUFWriter(tmp_path / "tok.gguf", "apertus")
    add_tokenizer(writer, tmp_path / "hf", pre="tekken")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours, theirs = gguf.load_tokenizer(tmp_path / "tok.gguf"), PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf")
    for line in ("HelloWorld McDonald's 12345 ÇA VA? über/unter\n\n\tx", "CamelCaseWords dé-jà 🇨🇭<|user_end|>"):
        assert ours.encode(line, add_special_tokens=False) == theirs.encode(line, add_special_tokens=False)


def test_chat_on_a_lone_gguf_file_equals_the_source(tmp_path):
    ref = silence_special_tokens(make_reference(seed=7))
    hf = save_reference(ref, tmp_path / "hf")
    q8_0 = {gguf_name(n): T.Q8_0 for n, p in ref.state_dict().items() if p.ndim == 2 and n != "lm_head.weight"}
    file = write_model(ref, tmp_path / "lone" / "chat-Q8_0.gguf", q8_0, hf)
    shutil.rmtree(tmp_path / "hf")  # the .gguf file has to stand alone
    answer = apertus_mlx.generate(*apertus_mlx.load(file), "Grüezi! Wie gaht's?", max_tokens=12, temperature=0.0)
    source = save_reference(ref, tmp_path / "hf2")
    assert answer == apertus_mlx.generate(
        *apertus_mlx.load(source), "Grüezi! Wie gaht's?", max_tokens=12, temperature=0.0
    )
    assert len(answer) > 0


@pytest.mark.skipif(not LLAMA_CPP_DEMO.is_file(), reason="tests/fixtures/demo-bf16.gguf not made")
def test_llama_cpp_conversion_of_the_demo_model_matches_our_bf16_load():
    ours = apertus_mlx.load_model(LLAMA_CPP_DEMO)
    assert ours.import_summary.format == "GGUF BF16"
    ids = np.array([[1, 5, 200, 1000, 4000, 17, 42, 2500, 9, 11]])
    # llama.cpp writes norms and xIELU scalars as F32; they fit bf16 exactly, so everything runs in bf16 as ours does.
    assert np.array_equal(_logits(ours, ids), _logits(apertus_mlx.load_model(DEMO), ids))
    ours_tok, theirs_tok = gguf.load_tokenizer(LLAMA_CPP_DEMO), load_tokenizer(DEMO)
    for text in ("Grüezi! 🇨🇭 def f(x):\n    return x<|assistant_end|>", "Il pleut à Genève; 日本語 12345"):
        assert ours_tok.encode(text) == theirs_tok.encode(text)
    chat = [{"role": "system", "content": "Kurz."}, {"role": "user", "content": "Hallo!"}]
    assert ours_tok.apply_chat_template(chat, add_generation_prompt=True) == theirs_tok.apply_chat_template(
        chat, add_generation_prompt=True
    )


def test_unknown_ggml_type_is_refused_by_name(tmp_path, models):
    file = tmp_path / "iq.gguf"
    shutil.copy(models["f32"][2], file)
    reader = GGUFReader(file, "r+")
    target = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    target.field.parts[4][0] = int(T.IQ4_NL)  # the type field rewritten in place; refused before its data is read
    reader.data.flush()
    with pytest.raises(CheckpointError, match=r"^iq\.gguf: tensor blk\.1\.ffn_up\.weight has ggml type IQ4_NL"):
        apertus_mlx.load_model(file)


def test_truncated_file_is_refused(tmp_path, models):
    data = models["f32"][2].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 5000])
    with pytest.raises(CheckpointError, match=r"^cut\.gguf: .*truncated"):
        apertus_mlx.load_model(tmp_path / "cut.gguf")


def test_wrong_architecture_is_refused(tmp_path):
    writer = GGUFWriter(tmp_path / "llama.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=r"^llama\.gguf: general\.architecture is 'llama', expected 'apertus'$"):
        apertus_mlx.load_model(tmp_path / "llama.gguf")


def test_pick_chooses_by_quant_tag():
    files = ["a/Apertus-8B-Q4_K_M.gguf", "a/Apertus-8B-Q4_K_S.gguf", "a/Apertus-8B-BF16.gguf", "mmproj-x-f16.gguf"]
    assert gguf.pick(files, "q4_k_m") == "a/Apertus-8B-Q4_K_M.gguf"
    assert gguf.pick(files, "BF16") == "a/Apertus-8B-BF16.gguf"
    assert gguf.pick(["only.gguf"], None) == "only.gguf"
    with pytest.raises(ModelNotFoundError, match=r"^no GGUF file for :Q8_0; .*tags here: BF16, Q4_K_M, Q4_K_S$"):
        gguf.pick(files, "Q8_0")
    with pytest.raises(ModelNotFoundError, match=r"^3 GGUF files; pick one"):
        gguf.pick(files, None)
    split = [f"m-Q8_0-0000{i}-of-00002.gguf" for i in (1, 2)]
    with pytest.raises(ModelNotFoundError, match="split into 2 files"):
        gguf.pick(split, "Q8_0")


def test_directory_of_several_gguf_files_is_refused_by_name(tmp_path, models):
    for name in ("x-Q8_0.gguf", "x-Q4_0.gguf"):
        shutil.copy(models["f32"][2], tmp_path / name)
    assert gguf.matches(tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"several GGUF files \(x-Q4_0\.gguf, x-Q8_0\.gguf\)"):
        apertus_mlx.load_model(tmp_path)
