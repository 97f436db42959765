"""Small random Apertus checkpoints written by transformers itself, the reference implementation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import ApertusConfig, ApertusForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from bench.yardstick.tokenizer import CHAT_TEMPLATE as CHAT_TEMPLATE_FILE
from bench.yardstick.tokenizer import SPECIAL_TOKENS

REPO = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = CHAT_TEMPLATE_FILE.read_text()
ASSISTANT_END = SPECIAL_TOKENS.index("<|assistant_end|>")
VOCAB = 384
# Multilingual text for the tiny BPE: enough merges for whole words, and every byte stays encodable.
_BPE_TEXT = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello Apertus!",
    "Grüezi mitenand. Die Hauptstadt der Schweiz ist Bern. Ça va très bien, merci.",
    "Il pleut à Genève; nevica a Lugano. 日本語のテキスト。 Emoji: 🇨🇭🧀⛰️",
    "def main():\n    print('hello')\n    return 0\n",
] * 8

# A decoder layer's projections, by their names under `model.layers.N.`.
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 12_000_000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 8192,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}


def make_reference(
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 160,
    vocab: int = VOCAB,
    tie: bool = False,
    seed: int = 0,
    **config_overrides,
) -> ApertusForCausalLM:
    """A float32 `ApertusForCausalLM` whose every parameter, norms and xIELU scalars included, is random."""
    torch.manual_seed(seed)
    config = ApertusConfig(
        vocab_size=vocab,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tie,
        **{"rope_parameters": dict(LLAMA3_ROPE), **config_overrides},
    )
    model = ApertusForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "act_fn" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def silence_special_tokens(model: ApertusForCausalLM) -> ApertusForCausalLM:
    """Zero the head rows of the special tokens: their logit is 0, below the best of the random others,
    so greedy decoding never emits markers or end-of-turn and chats run their full length."""
    with torch.no_grad():
        model.get_output_embeddings().weight[: len(SPECIAL_TOKENS)] = 0
    return model


def save_reference(model: ApertusForCausalLM, path: Path, schema: str = "v5", dtype: torch.dtype | None = None) -> Path:
    """A complete checkpoint directory: `save_pretrained` weights and config, tokenizer, generation config.

    With `schema="v4"`, config.json is rewritten in the transformers 4.56-4.x schema.
    """
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    if dtype is not None:
        model.float()
    save_tokenizer(path)
    GenerationConfig(
        bos_token_id=1, eos_token_id=[2, ASSISTANT_END], do_sample=True, temperature=0.8, top_p=0.9
    ).save_pretrained(path)
    if schema == "v4":
        to_v4_schema(path / "config.json")
    return path


def save_tokenizer(path: Path, chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `VOCAB` tokens with the Apertus special tokens and a chat template (the project's)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_BPE_TEXT, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = chat_template
    fast.save_pretrained(path)
    return fast


def to_v4_schema(config_file: Path) -> None:
    """Rewrite as checkpoints from transformers 4.56-4.x are: rope_theta + rope_scaling, explicit flags."""
    config = json.loads(config_file.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config.update(qk_norm=True, post_norm=False, mlp_bias=False, transformers_version="4.56.2")
    config_file.write_text(json.dumps(config, indent=2))


def short_context(tokens: int = 64) -> dict:
    """Config overrides for a model whose context is only `tokens` long."""
    return {
        "max_position_embeddings": tokens,
        "rope_parameters": {**LLAMA3_ROPE, "original_max_position_embeddings": tokens // 2},
    }


def reference_logits(model: ApertusForCausalLM, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


def max_rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
