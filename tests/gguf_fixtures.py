"""GGUF test files written with gguf-py's own writer: random valid ggml blocks, and tiny Apertus models.

`write_model` lays out a transformers `ApertusForCausalLM` the way llama.cpp's Apertus converter does (tensor
names, metadata keys, xIELU arrays, llama3 `rope_freqs`), with each weight stored in the ggml type asked for.
Quantized weights are random valid blocks, and the torch model's weight is replaced by their dequantization,
so the Hugging Face checkpoint saved from it is the exact reference for the GGUF file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, TokenType
from gguf.quants import dequantize, quantize

# Byte offsets of each type's fp16 scale fields; every other byte of a block may hold any value.
FP16_FIELDS = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.Q3_K: (108,),
    T.Q2_K: (80, 82),
}
BLOCK = {T.Q8_0: (34, 32), T.Q4_0: (18, 32), T.Q4_1: (20, 32), T.Q5_0: (22, 32), T.Q5_1: (24, 32)}
BLOCK |= {T.Q4_K: (144, 256), T.Q5_K: (176, 256), T.Q6_K: (210, 256), T.Q3_K: (110, 256), T.Q2_K: (84, 256)}
# Scale magnitudes that keep random blocks' weights near the reference model's (about 0.1).
SCALE = {T.Q8_0: 1e-3, T.Q4_0: 1e-2, T.Q4_1: 1e-2, T.Q5_0: 5e-3, T.Q5_1: 5e-3}
SCALE |= {T.Q4_K: 3e-4, T.Q5_K: 1.5e-4, T.Q6_K: 1e-4, T.Q3_K: 1e-3, T.Q2_K: 1e-3}

LAYER_NAMES = {
    "attention_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "feedforward_layernorm": "ffn_norm",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def random_blocks(qtype: T, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random valid blocks of `qtype` for a rows x cols weight, as uint8 [rows, bytes per row]."""
    size, per = BLOCK[qtype]
    rng = np.random.default_rng(seed)
    n = rows * cols // per
    blocks = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for at in FP16_FIELDS[qtype]:
        d = (np.abs(rng.standard_normal((n, 1))) + 0.2) * SCALE[qtype]
        blocks[:, at : at + 2] = d.astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def gguf_name(hf_name: str) -> str:
    """llama.cpp's tensor name for a transformers Apertus parameter."""
    name = hf_name.removesuffix(".weight")
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if name in top:
        return f"{top[name]}.weight"
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}.weight"


def llama3_factors(head_dim: int, theta: float, rope: dict) -> np.ndarray:
    """The per-frequency divisors llama3 scaling applies: 1 for short wavelengths, `factor` for long ones."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    context = rope["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < context / high:
            out.append(1.0)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_model(model, path: Path, types: dict[str, T] | T, tokenizer_dir: Path) -> Path:
    """`model` (transformers Apertus) as a GGUF file; `types` maps GGUF names (or one type for all) to ggml types.

    1-D tensors stay F32, as llama.cpp keeps them. The model's quantized weights are overwritten with the
    dequantized blocks written, so it stays the file's exact reference.
    """
    cfg = model.config
    rope = dict(cfg.rope_parameters)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, "apertus")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    act = {c: [] for c in ("alpha_p", "alpha_n", "beta", "eps")}
    seed = 0
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if ".act_fn." in name:
                act[name.rsplit(".", 1)[1]].append(float(p.float().reshape(-1)[0]))
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            gname = gguf_name(name)
            qtype = types if isinstance(types, T) else types.get(gname, T.F32)
            data = p.float().numpy()
            if p.ndim == 1 or qtype == T.F32:
                writer.add_tensor(gname, data.astype(np.float32))
            elif qtype == T.F16:
                writer.add_tensor(gname, data.astype(np.float16))
            elif qtype == T.BF16:
                writer.add_tensor(gname, quantize(data, T.BF16), raw_dtype=T.BF16)
            else:
                seed += 1
                blocks = random_blocks(qtype, *data.shape, seed=seed)
                writer.add_tensor(gname, blocks, raw_dtype=qtype)
                p.copy_(torch.from_numpy(dequantize(blocks, qtype).reshape(data.shape)))
    writer.add_tensor("rope_freqs.weight", llama3_factors(head_dim, rope["rope_theta"], rope))
    writer.add_xielu_alpha_p(act["alpha_p"])
    writer.add_xielu_alpha_n(act["alpha_n"])
    writer.add_xielu_beta(act["beta"])
    writer.add_xielu_eps(act["eps"])
    add_tokenizer(writer, tokenizer_dir)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_tokenizer(writer: GGUFWriter, tokenizer_dir: Path, pre: str = "gpt-2") -> None:
    """The Hugging Face tokenizer of `tokenizer_dir` as GGUF metadata: byte-level BPE, split rules named `pre`."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = dict(spec["model"]["vocab"])
    specials = {t["content"]: t["id"] for t in spec["added_tokens"]}
    vocab |= specials
    tokens = [None] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t in specials else TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(specials[config["bos_token"]])
    writer.add_eos_token_id(specials[config["eos_token"]])
    writer.add_unk_token_id(specials[config["unk_token"]])
    writer.add_pad_token_id(specials[config["pad_token"]])
    writer.add_add_bos_token(True)
    template = config.get("chat_template")
    if template is None and (tokenizer_dir / "chat_template.jinja").is_file():
        template = (tokenizer_dir / "chat_template.jinja").read_text()
    writer.add_chat_template(template)
