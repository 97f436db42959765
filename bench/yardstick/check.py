"""Self-checks for a yardstick tokenizer or model folder: ids, UTF-8 round-trips, chat template.

    python -m bench.yardstick.check apertus_mlx/demo_model

Exits non-zero on the first failed check. For a model folder it also loads the weights with
``AutoModelForCausalLM`` and checks the recorded held-out perplexity beats the unigram bar.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from transformers import AutoTokenizer

from bench.yardstick.tokenizer import SPECIAL_TOKENS

ROUND_TRIP = [
    "Hello, world! 👋🏽🇨🇭 naïve café",
    "日本語のテキスト、中文，한국어",
    "e\u0301 a\u0308 \u05e9\u05c1 \u0928\u093f",  # combining marks
    "  two  spaces\n\ttab\r\nCRLF",
    "Grüezi mitenand! Ça va? ¿Qué tal?",
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                    "days": {"type": "integer"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["city"],
            },
        },
    }
]
CONVERSATION = [
    {"role": "user", "content": "Wie ist das Wetter in Bern?"},
    {
        "role": "assistant",
        "reasoning_content": "Need the weather tool.",
        "content": "Ich schaue nach.",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bern"}}}],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "In Bern sind es 21 Grad."},
    {"role": "user", "content": "Danke!"},
]


def check_tokenizer(tok) -> None:
    """Special-token ids and exact decoding of awkward Unicode."""
    assert tok.is_fast, "expected a fast tokenizer"
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(t) == i, f"{t} is not id {i}"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)
    for s in ROUND_TRIP:
        ids = tok(s)["input_ids"]
        assert ids[0] == 1, "plain encodes start with <s>"
        assert tok.decode(ids, skip_special_tokens=True) == s, f"round-trip failed for {s!r}"


def check_template(tok) -> None:
    """The Apertus layout for the cases the CLI and apps produce."""
    full = tok.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True, enable_thinking=True, tools=TOOLS
    )
    assert full.startswith("<s><|system_start|>You are Apertus")
    assert re.search(r"Current date: \d{4}-\d{2}-\d{2}<\|system_end\|>", full)
    assert "<|developer_start|>Deliberation: enabled\nTool Capabilities:\nnamespace functions {" in full
    assert 'type get_weather = (_: {\n  // City name\n  city: string,\n  unit?: "c" | "f",\n' in full
    assert "  days?: number,\n  tags?: string[],\n}) => any;\n} // namespace functions<|developer_end|>" in full
    assert (
        "<|user_start|>Wie ist das Wetter in Bern?<|user_end|><|assistant_start|>"
        "<|inner_prefix|>Need the weather tool.<|inner_suffix|>Ich schaue nach."
        '<|tools_prefix|>[{"get_weather": {"city": "Bern"}}]<|tools_suffix|>'
        '["{\\"temp\\": 21}"]In Bern sind es 21 Grad.<|assistant_end|>'
        "<|user_start|>Danke!<|user_end|><|assistant_start|>"
    ) in full, full
    plain = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert plain == (
        "<s><|system_start|>Be brief.<|system_end|><|developer_start|>Deliberation: disabled\n"
        "Tool Capabilities: disabled<|developer_end|><|user_start|>Hi<|user_end|><|assistant_start|>"
    ), plain
    open_turn = tok.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=True)
    assert open_turn.endswith('<|tools_suffix|>["{\\"temp\\": 21}"]'), "an open turn gets no new header"
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == 1 and ids[1] != 1 and ids[-1] == 10, "one <s>, ends with <|assistant_start|>"


def check_model(folder: Path) -> None:
    """Loads through the Auto classes; recorded perplexity is far below the baselines."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "ApertusForCausalLM"
    assert GenerationConfig.from_pretrained(folder).eos_token_id == [2, 11]
    result = json.loads((folder / "eval.json").read_text())
    assert result["heldout_perplexity"] < result["unigram_perplexity"] / 10
    print(f"{folder}: held-out ppl {result['heldout_perplexity']} (unigram {result['unigram_perplexity']})")


def main() -> None:
    """Run all checks that apply to the folder."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.folder)
    check_tokenizer(tok)
    check_template(tok)
    if (args.folder / "config.json").exists():
        check_model(args.folder)
    print("all checks passed")


if __name__ == "__main__":
    main()
