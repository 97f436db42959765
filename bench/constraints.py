"""Grammar libraries for structured output, measured on this project's tokenizers.

    python -m bench.constraints [--big] [--libs llguidance,xgrammar,outlines-core]

For each tokenizer (the demo model's 4096 tokens, the yardstick `small` model's 8192, and with `--big` a
131,072-token byte-level BPE trained here, offline, on the Python sources installed with the interpreter, the
size of real Apertus's vocabulary) and each library, it measures:

- `tok s`: wrapping the Hugging Face tokenizer (once per model),
- `compile ms`: from a JSON schema to the first token mask (cold: no cache), for `{"type": "object"}`
  (what `json_object` needs) and for a nested schema with `$ref`, enums, bounds, a pattern and an array,
- `mask us`: the mean and worst time of one token mask while walking a valid answer token by token (the
  tokenizer's own tokenization of it), and `advance us`, the mean time to consume one token,
- schema coverage: for each of a list of JSON-schema keywords, whether the grammar takes a valid value and
  refuses an invalid one (enforced), takes both (ignored), or refuses the schema.

Only the libraries installed are measured (`pip install llguidance xgrammar outlines-core`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BIG_VOCAB = 131_072

NESTED = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"enum": ["CH", "DE", "FR", "IT", "AT"]},
        "population": {"type": "integer", "minimum": 0},
        "coordinates": {"$ref": "#/$defs/point"},
        "languages": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
        "capital": {"type": "boolean"},
        "postcode": {"type": "string", "pattern": "^[0-9]{4}$"},
        "mayor": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["city", "country", "population", "coordinates", "languages", "capital"],
    "additionalProperties": False,
    "$defs": {
        "point": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
            "required": ["lat", "lon"],
            "additionalProperties": False,
        }
    },
}
NESTED_ANSWER = {
    "city": "Zürich",
    "country": "CH",
    "population": 421878,
    "coordinates": {"lat": 47.3769, "lon": 8.5417},
    "languages": ["German", "English"],
    "capital": False,
    "postcode": "8001",
    "mayor": "Corine Mauch",
}
OBJECT_ANSWER = {
    "answer": "Bern is the federal city of Switzerland.",
    "confidence": 0.9,
    "sources": [{"title": "Swiss Federal Constitution", "year": 1999}, {"title": "Wikipedia", "year": None}],
    "ok": True,
}
CASES = [("object", {"type": "object"}, OBJECT_ANSWER), ("nested", NESTED, NESTED_ANSWER)]

# One schema per keyword (or pair of keywords), a value it accepts and one it refuses. A library enforces the
# keyword when its grammar takes the first and not the second; many libraries accept a schema and ignore a keyword.
FEATURES: dict[str, tuple[dict[str, Any], Any, Any]] = {
    "enum": ({"enum": ["a", "b", 3]}, "b", "c"),
    "const": ({"const": "fixed"}, "fixed", "other"),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, 3, True),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "x"),
    "allOf": (
        {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
        {"a": 1},
        {},
    ),
    "type list": ({"type": ["string", "null"]}, None, 3),
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"a": 1}, {"b": 1}),
    "additionalProperties false": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        {"a": 1},
        {"a": 1, "b": 2},
    ),
    "$ref/$defs": ({"$defs": {"x": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/$defs/x"}}, [1], ["x"]),
    "recursive $ref (depth 4)": (
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "v": {"type": "integer"},
                        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["v"],
                    "additionalProperties": False,
                }
            },
            "$ref": "#/$defs/node",
        },
        {"v": 1, "kids": [{"v": 2, "kids": [{"v": 3, "kids": [{"v": 4, "kids": []}]}]}]},
        {"v": "x"},
    ),
    "minimum/maximum": ({"type": "number", "minimum": -1.5, "maximum": 2.5}, 2.5, 3),
    "exclusiveMin/Max": ({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100}, 99, 100),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 15, 7),
    "min/maxLength": ({"type": "string", "minLength": 2, "maxLength": 5}, "abc", "abcdef"),
    "pattern": ({"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$"}, "AB-12", "ab-12"),
    "format date-time": ({"type": "string", "format": "date-time"}, "2025-09-02T10:00:00Z", "yesterday"),
    "format email": ({"type": "string", "format": "email"}, "a@b.ch", "not an email"),
    "min/maxItems": (
        {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
        [1, 2],
        [1, 2, 3, 4],
    ),
    "prefixItems": (
        {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
        [1, "a"],
        [1, 2],
    ),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    "additionalProperties schema": (
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"x": 1},
        {"x": "s"},
    ),
    "patternProperties": (
        {"type": "object", "patternProperties": {"^x-": {"type": "string"}}},
        {"x-a": "s"},
        {"x-a": 1},
    ),
    "min/maxProperties": ({"type": "object", "minProperties": 1, "maxProperties": 2}, {"a": 1}, {}),
    "propertyNames": ({"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}, {"abc": 1}, {"ABC": 1}),
    "if/then/else": ({"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}}, 3, -1),
    "not": ({"not": {"type": "string"}}, 3, "s"),
}


# ---- the libraries, behind one small interface --------------------------------------------------------------


class Library:
    name = ""

    def __init__(self, hf_tokenizer: Any, eos: list[int]):
        self.vocab = len(hf_tokenizer)

    def compile(self, schema: dict[str, Any]) -> Any:
        """A matcher at the start of the schema (the compiled grammar in it)."""
        raise NotImplementedError

    def mask(self, matcher: Any, buffer: np.ndarray) -> None:
        raise NotImplementedError

    def advance(self, matcher: Any, token: int) -> None:
        raise NotImplementedError

    def accepting(self, matcher: Any) -> bool:
        """Whether the text so far is a whole value of the schema."""
        raise NotImplementedError


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, hf_tokenizer: Any, eos: list[int]):
        super().__init__(hf_tokenizer, eos)
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=self.vocab, eos_token=eos)
        self.options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, overrides=self.options)
        matcher = self.ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def mask(self, matcher: Any, buffer: np.ndarray) -> None:
        matcher.unsafe_compute_mask_ptr(buffer.ctypes.data, buffer.nbytes)

    def advance(self, matcher: Any, token: int) -> None:
        if not matcher.consume_token(token):
            raise ValueError(matcher.get_error())

    def accepting(self, matcher: Any) -> bool:
        return matcher.is_accepting()


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, hf_tokenizer: Any, eos: list[int]):
        super().__init__(hf_tokenizer, eos)
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=self.vocab, stop_token_ids=eos)
        self.eos = eos[0]

    def compile(self, schema: dict[str, Any]) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        compiled = compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(", ", ": "), strict_mode=True
        )
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, matcher: Any, buffer: np.ndarray) -> None:
        matcher.fill_next_token_bitmask(buffer[None])

    def advance(self, matcher: Any, token: int) -> None:
        if not matcher.accept_token(token):
            raise ValueError(f"token {token} rejected")

    def accepting(self, matcher: Any) -> bool:
        return matcher.accept_token(self.eos)


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, hf_tokenizer: Any, eos: list[int]):
        super().__init__(hf_tokenizer, eos)
        import outlines_core

        self.oc = outlines_core
        # outlines-core takes the vocabulary as bytes -> ids; byte-level BPE tokens map back through GPT-2's table.
        decode = byte_decoder()
        special = set(hf_tokenizer.all_special_ids)
        vocab: dict[bytes, list[int]] = {}
        for token, i in hf_tokenizer.get_vocab().items():
            if i in special or i in eos:
                continue
            vocab.setdefault(bytes(decode[c] for c in token), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos[0], vocab)

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocabulary))

    def mask(self, matcher: Any, buffer: np.ndarray) -> None:
        matcher.write_mask_into(buffer.ctypes.data, buffer.size, 4)

    def advance(self, matcher: Any, token: int) -> None:
        matcher.advance(token, return_tokens=False)

    def accepting(self, matcher: Any) -> bool:
        return matcher.is_finished()


LIBRARIES = {cls.name: cls for cls in (LLGuidance, XGrammar, OutlinesCore)}


def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes, reversed: the alphabet of byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


# ---- tokenizers ----------------------------------------------------------------------------------------------


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def big_tokenizer(cache: Path) -> Any:
    """A byte-level BPE of 131,072 tokens with the Apertus special tokens, trained once and kept in `cache`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bench.yardstick.tokenizer import SPECIAL_TOKENS

    if not (cache / "tokenizer.json").exists():
        paths = sysconfig.get_paths()
        files = sorted(p for root in (paths["stdlib"], paths["purelib"]) for p in Path(root).rglob("*.py"))

        def texts(limit: int = 120_000_000):
            seen = 0
            for path in files:
                try:
                    text = path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                seen += len(text)
                yield text
                if seen > limit:
                    return

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=BIG_VOCAB,
            min_frequency=2,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        print(f"training a {BIG_VOCAB}-token BPE (about a minute)...", file=sys.stderr)
        tok.train_from_iterator(texts(), trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
        )
        fast.save_pretrained(cache)
    return load_tokenizer(cache)


# ---- measuring -----------------------------------------------------------------------------------------------


def measure(lib: Library, schema: dict[str, Any], answer: Any, hf_tokenizer: Any) -> dict[str, float]:
    buffer = np.zeros((lib.vocab + 31) // 32, dtype=np.int32)
    compiles = []
    for _ in range(3):  # the median of three cold compiles: the first call of a library also warms it up
        start = time.perf_counter()
        matcher = lib.compile(schema)
        lib.mask(matcher, buffer)
        compiles.append(time.perf_counter() - start)
    compile_ms = statistics.median(compiles) * 1e3
    tokens = hf_tokenizer.encode(json.dumps(answer, ensure_ascii=False), add_special_tokens=False)
    masks, advances = [], []
    for token in tokens:
        start = time.perf_counter()
        lib.mask(matcher, buffer)
        masks.append(time.perf_counter() - start)
        if not (buffer[token // 32] >> (token % 32)) & 1:
            raise ValueError(f"the mask forbids token {token} of a valid answer")
        start = time.perf_counter()
        lib.advance(matcher, token)
        advances.append(time.perf_counter() - start)
    return {
        "compile_ms": compile_ms,
        "mask_us": statistics.mean(masks) * 1e6,
        "mask_max_us": max(masks) * 1e6,
        "advance_us": statistics.mean(advances) * 1e6,
        "tokens": len(tokens),
    }


def accepts(lib: Library, schema: dict[str, Any], value: Any, hf_tokenizer: Any) -> bool:
    """Whether `lib`'s grammar for `schema` lets `value`, as `json.dumps` writes it, be generated."""
    matcher = lib.compile(schema)
    buffer = np.zeros((lib.vocab + 31) // 32, dtype=np.int32)
    try:
        for token in hf_tokenizer.encode(json.dumps(value, ensure_ascii=False), add_special_tokens=False):
            lib.mask(matcher, buffer)
            if not (buffer[token // 32] >> (token % 32)) & 1:
                return False
            lib.advance(matcher, token)
    except Exception:
        return False
    return lib.accepting(matcher)


def coverage(lib: Library, hf_tokenizer: Any) -> dict[str, list[str]]:
    """Each feature as enforced, ignored (its invalid value passes), wrong (its valid value fails) or refused."""
    verdicts: dict[str, list[str]] = {"enforced": [], "ignored": [], "wrong": [], "refused": []}
    for name, (schema, good, bad) in FEATURES.items():
        try:
            lib.compile(schema)
        except Exception:
            verdicts["refused"].append(name)
            continue
        if not accepts(lib, schema, good, hf_tokenizer):
            verdicts["wrong"].append(name)
        elif accepts(lib, schema, bad, hf_tokenizer):
            verdicts["ignored"].append(name)
        else:
            verdicts["enforced"].append(name)
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help=f"add a {BIG_VOCAB}-token tokenizer (trained once)")
    parser.add_argument("--big-cache", type=Path, default=Path.home() / ".cache" / "apertus-mlx" / "bpe-131k")
    parser.add_argument("--libs", default=",".join(LIBRARIES))
    args = parser.parse_args()

    tokenizers = [
        ("demo 4k", load_tokenizer(REPO / "apertus_mlx" / "demo_model")),
        ("yardstick 8k", load_tokenizer(REPO / "bench" / "yardstick" / "models" / "small")),
    ]
    if args.big:
        tokenizers.append(("bpe 131k", big_tokenizer(args.big_cache)))

    header = (
        "| tokenizer | library | tok s | compile ms object / nested | mask us mean (max) object / nested | advance us |"
    )
    print(header)
    print("|---|---|---:|---:|---:|---:|")
    features: dict[str, dict[str, list[str]]] = {}
    for tok_name, hf in tokenizers:
        eos = [hf.convert_tokens_to_ids("<|assistant_end|>"), hf.eos_token_id]
        for lib_name in args.libs.split(","):
            try:
                start = time.perf_counter()
                lib = LIBRARIES[lib_name](hf, eos)
                setup = time.perf_counter() - start
            except ImportError:
                print(f"| {tok_name} | {lib_name} | not installed | | | |")
                continue
            rows = []
            for _case, schema, answer in CASES:
                try:
                    rows.append(measure(lib, schema, answer, hf))
                except Exception as e:
                    rows.append({"error": f"{type(e).__name__}: {str(e)[:60]}"})
            if lib_name not in features:
                features[lib_name] = coverage(lib, hf)

            def cell(r: dict[str, Any], fmt: str) -> str:
                return r["error"] if "error" in r else fmt.format(**r)

            compile_ms = " / ".join(cell(r, "{compile_ms:.1f}") for r in rows)
            masks = " / ".join(cell(r, "{mask_us:.0f} ({mask_max_us:.0f})") for r in rows)
            advance = " / ".join(cell(r, "{advance_us:.0f}") for r in rows)
            print(f"| {tok_name} | {lib_name} | {setup:.2f} | {compile_ms} | {masks} | {advance} |", flush=True)
    print()
    head = "ignored (invalid output passes) | refused | wrong"
    print(f"| library | of {len(FEATURES)} schema keywords: enforced | {head} |")
    print("|---|---:|---|---|---|")
    for lib_name, v in features.items():
        cells = [", ".join(v[k]) or "-" for k in ("ignored", "refused", "wrong")]
        print(f"| {lib_name} | {len(v['enforced'])} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
