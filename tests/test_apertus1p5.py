"""Apertus 1.5's text path: parity with transformers' apertus1p5 models, checkpoints, config errors, a chat.

The reference models are small and random, written by transformers' own `save_pretrained`: the text-only
`Apertus1p5TextForCausalLM` (`model.*`) and the full `Apertus1p5ForConditionalGeneration`
(`model.language_model.*`, `lm_head.weight`, and tiny image/audio tokenizers that the text path skips).
Their vocabulary is split as the release's: 512 input ids (text, then "visual" and "audio" ids), 384 output ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Apertus1p5Config,
    Apertus1p5ForConditionalGeneration,
    Apertus1p5TextConfig,
    Apertus1p5TextForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

import apertus_mlx
from apertus_mlx import ChatSession, ConfigError, Done, SamplingOptions, TextDelta
from apertus_mlx.constraints import Constraint, check_response_format

from checkpoints import LLAMA3_ROPE, max_rel_error, reference_logits

VOCAB, OUTPUT_VOCAB = 512, 384  # input ids 384..511 are the "visual" (384..447) and "audio" (448..511) ids
TEMPLATE = (Path(__file__).resolve().parent / "templates" / "apertus1p5_rules.jinja").read_text()
# Ids 0..31 are special tokens; in Apertus 1.5 the reasoning markers are the plain tokens 32 and 33.
CHAT_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<|system_start|>",
    "<|system_end|>",
    "<|developer_start|>",
    "<|developer_end|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|tools_prefix|>",
    "<|tools_suffix|>",
]
SPECIAL = CHAT_TOKENS + [f"<|reserved_{i}|>" for i in range(len(CHAT_TOKENS), 32)]
PLAIN_MARKERS = ["<|inner_prefix|>", "<|inner_suffix|>"]
ASSISTANT_END = SPECIAL.index("<|assistant_end|>")
_BPE_TEXT = ["The quick brown fox jumps over the lazy dog. Bern is the capital. Let me think about it."] * 8
TINY_VISION = {
    "codebook_size": 64,
    "embed_dim": 8,
    "latent_channels": 32,
    "base_channels": 32,
    "channel_multiplier": [1, 1],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "resolution": 16,
}
TINY_AUDIO = {
    "model_type": "wavtokenizer_encoder",
    "num_filters": 4,
    "upsampling_ratios": [2],
    "num_residual_layers": 1,
    "num_lstm_layers": 1,
    "hidden_size": 8,
    "codebook_size": 64,
    "codebook_dim": 8,
}


def text_config(**overrides) -> dict:
    config = dict(
        vocab_size=VOCAB,
        output_vocab_size=OUTPUT_VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        rope_parameters=dict(LLAMA3_ROPE),
    )
    return {**config, **overrides}


def make_reference(full: bool, seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 reference whose decoder and head parameters, norms and xIELU scalars included, are random."""
    torch.manual_seed(seed)
    if full:
        config = Apertus1p5Config(
            text_config=text_config(**overrides),
            vision_config=TINY_VISION,
            audio_config=TINY_AUDIO,
            image_token_id=20,
            audio_token_id=21,
            image_token_offset=OUTPUT_VOCAB,
            audio_token_offset=OUTPUT_VOCAB + TINY_VISION["codebook_size"],
        )
        model = Apertus1p5ForConditionalGeneration(config)
    else:
        model = Apertus1p5TextForCausalLM(Apertus1p5TextConfig(**text_config(**overrides)))
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_tokenizer." in name:
                continue
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "act_fn" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def save_reference(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    save_tokenizer(path)
    GenerationConfig(bos_token_id=1, eos_token_id=[2], do_sample=True, temperature=0.8, top_p=0.9).save_pretrained(path)
    return path


def save_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE of 384 tokens: 32 special ones, then the reasoning markers as plain tokens 32 and 33."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=OUTPUT_VOCAB,
        special_tokens=SPECIAL + PLAIN_MARKERS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_BPE_TEXT, trainer)
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        if added["content"] in PLAIN_MARKERS:
            added["special"] = False
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    return fast


def our_logits(model, ids: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(ids)).astype(mx.float32))


def prompt_ids(rows: int, length: int, seed: int) -> np.ndarray:
    """Random ids over the whole input vocabulary, and surely some text, visual and audio ones."""
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(rows, length))
    ids[:, :3] = [5, OUTPUT_VOCAB + 7, VOCAB - 1]
    return ids


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    ref = make_reference(full=True, seed=1)
    return ref, save_reference(ref, tmp_path_factory.mktemp("full") / "ckpt")


# ---- parity ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("full", "kv_heads"),
    [(False, 2), (True, 2), (True, 1), (False, 4)],
    ids=["text-gqa2", "full-gqa2", "full-gqa4", "text-mha"],
)
def test_logits_match_reference(tmp_path, full, kv_heads):
    ref = make_reference(full=full, seed=kv_heads, num_key_value_heads=kv_heads)
    path = save_reference(ref, tmp_path / "ckpt")
    names = set(mx.load(str(path / "model.safetensors")))
    prefix = "model.language_model." if full else "model."
    assert {"lm_head.weight", f"{prefix}embed_tokens.weight"} <= names
    assert any(n.startswith("model.vision_tokenizer.") for n in names) is full

    model = apertus_mlx.load_model(path)
    assert (model.args.vocab_size, model.args.input_vocab_size) == (OUTPUT_VOCAB, VOCAB)
    assert model.model.embed_tokens.weight.shape == (VOCAB, 64)
    params = {name for name, _ in tree_flatten(model.parameters())}
    assert params == {n for n in names if "_tokenizer." not in n}  # HF names, the media tokenizers left out

    ids = prompt_ids(2, 24, seed=kv_heads)
    ours, expected = our_logits(model, ids), reference_logits(ref, ids)
    assert ours.shape == expected.shape == (2, 24, OUTPUT_VOCAB)
    assert max_rel_error(ours, expected) <= 1e-4


def test_positions_past_the_original_context(tmp_path):
    # llama3 scaling acts past `original_max_position_embeddings`: shrink it to 64 so 160 positions reach well past.
    rope = {**LLAMA3_ROPE, "original_max_position_embeddings": 64}
    ref = make_reference(full=False, seed=5, rope_parameters=rope, max_position_embeddings=256)
    model = apertus_mlx.load_model(save_reference(ref, tmp_path / "ckpt"))
    assert model.args.rope_scaling["original_max_position_embeddings"] == 64
    assert model.args.max_position_embeddings == 256  # the config decides the context
    ids = prompt_ids(1, 160, seed=5)
    ours, expected = our_logits(model, ids), reference_logits(ref, ids)
    assert max_rel_error(ours[:, 64:], expected[:, 64:]) <= 1e-4


def test_default_rope_is_the_references(tmp_path):
    ref = make_reference(full=True, seed=2)
    path = save_reference(ref, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    del config["text_config"]["rope_parameters"]
    (path / "config.json").write_text(json.dumps(config))
    args = apertus_mlx.load_model(path).args
    expected = Apertus1p5TextConfig().rope_parameters
    assert args.rope_theta == expected["rope_theta"] == 12_000_000.0
    assert args.rope_scaling == {k: v for k, v in expected.items() if k not in ("rope_theta",)}


def test_incremental_decoding_equals_full_forward(full_checkpoint):
    _, path = full_checkpoint
    model = apertus_mlx.load_model(path)
    ids = prompt_ids(1, 20, seed=3)
    full = our_logits(model, ids)

    def incremental() -> np.ndarray:
        cache = apertus_mlx.make_cache(model)
        steps = [np.array(model(mx.array(ids[:, :12]), cache=cache))]
        steps += [np.array(model(mx.array(ids[:, i : i + 1]), cache=cache)) for i in range(12, 20)]
        return np.concatenate(steps, axis=1)

    compiled = incremental()  # one token at a time goes through the compiled decode step
    np.testing.assert_allclose(compiled, full, rtol=0, atol=1e-4 * np.abs(full).max())
    model.compiled_decode = False
    np.testing.assert_array_equal(incremental(), compiled)


# ---- saving ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_save_model_round_trip(full_checkpoint, tmp_path, quantized):
    _, path = full_checkpoint
    model = apertus_mlx.load_model(path)
    if quantized:
        nn.quantize(model, group_size=32, bits=8)
    config = json.loads((path / "config.json").read_text())
    out = apertus_mlx.save_model(tmp_path / "saved", model, config, copy_from=path)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "apertus1p5"
    assert saved["text_config"]["output_vocab_size"] == OUTPUT_VOCAB and saved["text_config"]["vocab_size"] == VOCAB
    assert ("quantization" in saved) is quantized
    again = apertus_mlx.load_model(out)
    ids = prompt_ids(1, 16, seed=4)
    np.testing.assert_array_equal(our_logits(again, ids), our_logits(model, ids))
    assert apertus_mlx.load_tokenizer(out).eos_token_ids == {2, ASSISTANT_END}


# ---- config errors --------------------------------------------------------------------------------------------


def _edit(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c.update(model_type="apertus2"),
            "config.json: model_type is 'apertus2', expected one of 'apertus', 'apertus1p5_text', 'apertus1p5'",
        ),
        (
            lambda c: c.pop("text_config"),
            "config.json: model_type 'apertus1p5' needs a text_config object, which is missing",
        ),
        (
            lambda c: c["text_config"].update(output_vocab_size=VOCAB + 1),
            f"config.json: text_config.output_vocab_size {VOCAB + 1} must be in 1..vocab_size ({VOCAB})",
        ),
        (
            lambda c: c["text_config"].pop("hidden_size"),
            "config.json: missing key(s) text_config.hidden_size",
        ),
        (
            lambda c: c["text_config"].update(tie_word_embeddings=True),
            "config.json: text_config.tie_word_embeddings=true with output_vocab_size 384 < vocab_size 512 "
            "is not supported (released checkpoints are untied)",
        ),
    ],
    ids=["model-type", "no-text-config", "output-vocab", "missing-key", "tied-pruned"],
)
def test_config_errors(full_checkpoint, tmp_path, edit, message):
    _, path = full_checkpoint
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    (bad / "model.safetensors").symlink_to(path / "model.safetensors")
    _edit(bad, edit)
    with pytest.raises(ConfigError) as e:
        apertus_mlx.load_model(bad)
    assert str(e.value) == message


def test_text_only_output_vocab_error(tmp_path):
    path = save_reference(make_reference(full=False), tmp_path / "ckpt")
    _edit(path, lambda c: c.update(output_vocab_size=0))
    with pytest.raises(ConfigError, match=r"^config.json: output_vocab_size 0 must be in 1..vocab_size \(512\)$"):
        apertus_mlx.load_model(path)


# ---- a chat ---------------------------------------------------------------------------------------------------


class Scripted:
    """The real model, but all the probability on the script's next token (as in tests/test_session_format.py)."""

    def __init__(self, model):
        self._model, self.script, self.start = model, [], 0

    def __call__(self, inputs, cache=None):
        logits = self._model(inputs, cache=cache)
        step = cache[0].offset - self.start
        token = self.script[min(max(step, 0), len(self.script) - 1)]
        return mx.where(mx.arange(logits.shape[-1]) == token, 100.0, -100.0) * mx.ones_like(logits)

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_chat_turn_separates_reasoning_marked_by_plain_tokens(full_checkpoint):
    _, path = full_checkpoint
    model, tokenizer = apertus_mlx.load(path)
    inner = [tokenizer.convert_tokens_to_ids(m) for m in PLAIN_MARKERS]
    assert inner == [32, 33] and not set(inner) & set(tokenizer.all_special_ids)
    assert tokenizer.eos_token_ids == {2, ASSISTANT_END}  # generation_config's, plus <|assistant_end|>

    scripted = Scripted(model)
    session = ChatSession(scripted, tokenizer, think=True, options=SamplingOptions(max_tokens=40, temperature=0))
    prompt = session.render([{"role": "user", "content": "Capital of Switzerland?"}])
    assert "Deliberation: enabled" in tokenizer.decode(prompt)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    script = [32, *encode(" Let me think"), 33, *encode(" Bern"), ASSISTANT_END]
    scripted.script, scripted.start = script, len(prompt)
    events = list(session.stream("Capital of Switzerland?"))
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "stop" and done.tokens == script
    assert (done.reasoning, done.answer) == (" Let me think", " Bern")
    channels = {e.channel for e in events if isinstance(e, TextDelta)}
    assert channels == {"reasoning", "answer"}
    assert session.messages[-1] == {"role": "assistant", "content": " Bern", "reasoning_content": " Let me think"}
    # The history re-renders to the very tokens generated: the markers encode back to 32 and 33.
    again = session.render(session.messages)
    assert again[len(prompt) : len(prompt) + len(script) - 1] == script[:-1]


def markers_only_in_vocab(path: Path) -> None:
    """Make the markers entries of the BPE vocabulary only, not added tokens: text to every tokenizer tool."""
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in PLAIN_MARKERS]
    (path / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("markers", ["added", "vocab"])
def test_constrained_answer_never_writes_a_plain_marker(tmp_path, markers):
    save_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text('{"eos_token_id": 2}')
    if markers == "vocab":
        markers_only_in_vocab(tmp_path)
    tokenizer = apertus_mlx.load_tokenizer(tmp_path)
    assert [tokenizer.convert_tokens_to_ids(m) for m in PLAIN_MARKERS] == [32, 33]
    constraint = Constraint(check_response_format({"type": "json_object"}), tokenizer, OUTPUT_VOCAB)
    for token in tokenizer.encode('{"a": "', add_special_tokens=False):
        constraint.advance(token)
    allowed = np.array(constraint.mask()) == 0
    assert allowed.shape == (OUTPUT_VOCAB,)
    assert allowed[tokenizer.encode("B", add_special_tokens=False)[0]]  # text inside the string
    # To the grammar "<|inner_prefix|>" may be text inside a JSON string; to the turn parser it is a switch.
    assert not allowed[32] and not allowed[33]


def test_image_parts_need_the_image_markers(full_checkpoint):
    _, path = full_checkpoint
    model, tokenizer = apertus_mlx.load(path)
    session = ChatSession(model, tokenizer)
    image = {
        "role": "user",
        "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}],
    }
    # This checkpoint's vision tokenizer does not fit the image processor (test_vision_chat.py chats about images
    # with one that does): refused in one line, before any image is read.
    with pytest.raises(ConfigError, match=r"ckpt: the image processor's spatial_factor 16 is not the vision tok"):
        session.render([image])
    audio = {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
    with pytest.raises(apertus_mlx.ApertusError, match=r"^message content part of type 'input_audio' is not supported"):
        session.render([audio])
