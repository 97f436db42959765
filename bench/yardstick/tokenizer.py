"""Train the yardstick byte-level BPE tokenizer and save it in Hugging Face layout.

    python -m bench.yardstick.tokenizer --vocab 4096 --out bench/yardstick/data/tokenizer-4096

Writes tokenizer.json, tokenizer_config.json (with the chat template embedded) and
chat_template.jinja, loadable with ``transformers.AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from bench.yardstick.common import CORPUS_DIR, DATA_DIR, HERE, read_jsonl

# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3, then the Apertus chat markers.
SPECIAL_TOKENS = [
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
    "<|inner_prefix|>",
    "<|inner_suffix|>",
    "<|tools_prefix|>",
    "<|tools_suffix|>",
]
CHAT_TEMPLATE = HERE / "chat_template.jinja"
MODEL_MAX_LENGTH = 65536


def texts(corpus: Path) -> Iterator[str]:
    """Training-split texts only: the held-out split must not shape the vocabulary either."""
    for row in read_jsonl(corpus / "train.jsonl"):
        yield row["text"]


def train(corpus: Path, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE: every string is representable, so decoding round-trips UTF-8."""
    tok = Tokenizer(models.BPE())
    # No normalizer: any normalization (NFC, lowercasing) would break exact round-trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts(corpus), trainer=trainer)
    # Plain encodes start with <s>, as Apertus' own tokenizer does; chat templates add it themselves.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def write_config(out: Path) -> None:
    """Write tokenizer_config.json and chat_template.jinja for an existing tokenizer.json."""
    template = CHAT_TEMPLATE.read_text(encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "additional_special_tokens": SPECIAL_TOKENS[4:],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "additional_special_tokens": SPECIAL_TOKENS[4:],
            },
            indent=2,
        )
        + "\n"
    )


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of ``src`` into a model folder ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        shutil.copy2(src / name, dst / name)


def main() -> None:
    """Train (or only re-template) a tokenizer."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--corpus", type=Path, default=CORPUS_DIR)
    ap.add_argument("--out", type=Path, default=None, help="default: data/tokenizer-<vocab>")
    ap.add_argument("--config-only", action="store_true", help="rewrite config and chat template only")
    args = ap.parse_args()
    out = args.out or DATA_DIR / f"tokenizer-{args.vocab}"
    out.mkdir(parents=True, exist_ok=True)
    if not args.config_only:
        train(args.corpus, args.vocab).save(str(out / "tokenizer.json"))
    write_config(out)
    print(f"tokenizer saved to {out}")


if __name__ == "__main__":
    main()
