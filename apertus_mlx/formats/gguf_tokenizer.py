"""The tokenizer a GGUF file carries in its metadata, rebuilt as a Hugging Face fast tokenizer for mlx-lm.

GGUF stores a byte-level BPE ("gpt2" model) as its token strings, merges and token types, the special ids,
and the name of the pre-tokenizer's split rules (`tokenizer.ggml.pre`), not the rules themselves; the names
Apertus files use are mapped to their rules here.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from gguf import GGUFReader, TokenType
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ..errors import CheckpointError
from .gguf_tensors import metadata

log = logging.getLogger("apertus_mlx.formats")

_LETTERS_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LETTERS_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
# Split rules by `tokenizer.ggml.pre` name; None means GPT-2's rules, built into the byte-level step.
SPLITS: dict[str, str | None] = {
    "gpt-2": None,
    "default": None,
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    ),
    "tekken": (
        rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}*{_LETTERS_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}+"
        rf"{_LETTERS_LOWER}*|\p{{N}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}
# These vocabularies take a whole word that is itself a token before trying merges (`ignore_merges`).
WHOLE_WORDS = {"llama-bpe", "tekken"}


def build(reader: GGUFReader, where: str) -> TokenizerWrapper:
    """An mlx-lm `TokenizerWrapper` from the metadata: eos ids are the file's eos and `<|assistant_end|>`."""
    from ..load import END_OF_TURN

    fast = hf_tokenizer(reader, where)
    eos = metadata(reader, "tokenizer.ggml.eos_token_id")
    # mlx-lm picks the streaming detokenizer and tool parser from saved files; saving keeps that logic its own.
    with tempfile.TemporaryDirectory(prefix="apertus-gguf-tokenizer-") as tmp:
        fast.save_pretrained(tmp)
        wrapper = load_mlx_lm_tokenizer(Path(tmp), eos_token_ids=[] if eos is None else [int(eos)])
    end = wrapper.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end, int) and end != wrapper.unk_token_id:
        wrapper.add_eos_token(END_OF_TURN)
    return wrapper


def hf_tokenizer(reader: GGUFReader, where: str) -> PreTrainedTokenizerFast:
    """The fast tokenizer with the file's special tokens and chat template."""
    model = metadata(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"{where}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
    tokens: list[str] = metadata(reader, "tokenizer.ggml.tokens")
    merges: list[str] = metadata(reader, "tokenizer.ggml.merges", [])
    types = metadata(reader, "tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    pre = metadata(reader, "tokenizer.ggml.pre", "gpt-2")
    vocab, pairs = {t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre in WHOLE_WORDS))
    tok.pre_tokenizer = _pre_tokenizer(pre, where)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(
        [
            AddedToken(t, special=ty == TokenType.CONTROL, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty in (TokenType.CONTROL, TokenType.USER_DEFINED)
        ]
    )
    special = {}
    for role in ("bos", "eos", "unk", "pad"):
        key = "padding" if role == "pad" else "unknown" if role == "unk" else role
        if (i := metadata(reader, f"tokenizer.ggml.{key}_token_id")) is not None:
            special[f"{role}_token"] = tokens[int(i)]
    tok.post_processor = _post_processor(reader, special)
    controls = [t for t, ty in zip(tokens, types, strict=True) if ty == TokenType.CONTROL]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=[t for t in controls if t not in special.values()],
        clean_up_tokenization_spaces=False,
        **special,
    )
    fast.chat_template = metadata(reader, "tokenizer.chat_template")
    return fast


def _pre_tokenizer(name: str, where: str) -> pre_tokenizers.PreTokenizer:
    if name not in SPLITS:
        log.warning("%s: unknown tokenizer.ggml.pre %r; splitting text by GPT-2's rules", where, name)
    split = SPLITS.get(name)
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _post_processor(reader: GGUFReader, special: dict[str, str]) -> processors.PostProcessor:
    """BOS (and EOS) added around encoded text as the file's add_bos_token / add_eos_token say."""
    ids = {metadata(reader, f"tokenizer.ggml.{r}_token_id"): special.get(f"{r}_token") for r in ("bos", "eos")}
    bos = special.get("bos_token") if metadata(reader, "tokenizer.ggml.add_bos_token", False) else None
    eos = special.get("eos_token") if metadata(reader, "tokenizer.ggml.add_eos_token", False) else None
    single = " ".join(t for t in (bos, "$A", eos) if t)
    pair = " ".join(t for t in (bos, "$A", eos, bos, "$B", eos) if t)
    used = [(tok, int(i)) for i, tok in ids.items() if tok in (bos, eos) and tok]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=used)
