"""Concurrent chat sessions on one `apertus_mlx.Engine` vs mlx-lm's `BatchGenerator`, on the same weights.

Run through `python -m bench.chat_speed --sessions 1,4,8`. Three measurements:

- Aggregate decode: N sessions, each with its own prompt of the same length, started together from N
  threads, greedy, `max_tokens` each. Decode tok/s = the tokens generated after each session's first
  token, summed, over the decode phase: from the first session's first token to the last session's
  end. mlx-lm's `BatchGenerator` gets the very same prompt tokens in one batch, timed the same way.
- First token under load: the time to first token of a fresh session while 3 others decode long
  answers, over the same session's time to first token when nothing else runs.
- Batched vs solo: each prompt's greedy tokens alone and in a batch of `agree_batch`; the fraction of
  identical sequences and the mean length of their common prefix.

Times are taken on the consuming threads, as an app sees them. Every round after a warm-up is kept; the
summary is the median. Ours and mlx-lm alternate within each round.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from apertus_mlx import Done, Engine, PrefillProgress, SamplingOptions

POOL = Path(__file__).resolve().parent.parent / "quant_recipes" / "data" / "multilingual.txt"
SYSTEM = "You are a helpful assistant."  # fixed, so no prompt carries today's date
FILLERS = (" x", " .", " a", "!", " 1")  # appended one at a time to reach an exact prompt length


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---- prompts ----------------------------------------------------------------------------------------


def make_prompts(render: Callable[[str], list[int]], count: int, length: int) -> list[tuple[str, list[int]]]:
    """`count` different user messages whose rendered chats are `length` tokens (as near as the tokenizer
    allows), each starting at a different place of the multilingual text; with their token ids."""
    words = POOL.read_text(encoding="utf-8").split()
    prompts = []
    for i in range(count):
        start = i * len(words) // count
        rotated = (words[start:] + words[:start]) * (length // len(words) + 2)
        prompts.append(_fit(render, rotated, length))
    return prompts


def _fit(render: Callable[[str], list[int]], words: list[str], length: int) -> tuple[str, list[int]]:
    lo, hi = 1, len(words)  # the most words whose rendering is at most `length` tokens
    if (least := len(render(words[0]))) > length:
        raise ValueError(f"a {length}-token prompt is too short: one word in the chat template is {least} tokens")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(render(" ".join(words[:mid]))) <= length else (lo, mid - 1)
    text = " ".join(words[:lo])
    tokens = render(text)
    while len(tokens) < length:
        grown = [(t, render(t)) for t in (text + f for f in FILLERS)]
        fitting = [(t, ids) for t, ids in grown if len(ids) <= length and len(ids) > len(tokens)]
        if not fitting:
            break
        text, tokens = max(fitting, key=lambda x: len(x[1]))
    return text, tokens


# ---- ours: one Engine, one thread per session ---------------------------------------------------------


@dataclass
class Turn:
    """One session's turn as its consumer thread saw it (perf_counter seconds)."""

    submitted: float
    first: float  # the first event after prefill: the first token's text (or Done)
    end: float
    done: Done


def consume(engine: Engine, chat: Any, text: str, on_first: Callable[[], None] | None = None) -> Turn:
    submitted = time.perf_counter()
    first = None
    for event in engine.stream(chat, text):
        if first is None and not isinstance(event, PrefillProgress):
            first = time.perf_counter()
            if on_first is not None:
                on_first()
        if isinstance(event, Done):
            done = event
    return Turn(submitted, first, time.perf_counter(), done)


def new_sessions(engine: Engine, count: int, max_tokens: int) -> list[Any]:
    options = SamplingOptions(max_tokens=max_tokens, temperature=0)
    return [engine.session(options=options, system=SYSTEM) for _ in range(count)]


def run_concurrently(engine: Engine, texts: list[str], max_tokens: int) -> list[Turn]:
    """Each text in a fresh session, all submitted at once from one thread each."""
    sessions = new_sessions(engine, len(texts), max_tokens)  # made first: a busy engine may make them late
    start = threading.Barrier(len(texts))
    turns: list[Turn | None] = [None] * len(texts)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        start.wait()
        try:
            turns[i] = consume(engine, sessions[i], texts[i])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return turns  # type: ignore[return-value]


def decode_rate(firsts: list[float], ends: list[float], counts: list[int]) -> dict:
    """Tokens after each stream's first one, over the decode phase (first first token to last end)."""
    window = max(ends) - min(firsts)
    tokens = sum(max(n - 1, 0) for n in counts)
    return {"decode_tps": tokens / window if window > 0 else 0.0, "decode_tokens": tokens, "window_s": window}


def ours_decode(engine: Engine, prompts: list[tuple[str, list[int]]], max_tokens: int) -> dict:
    turns = run_concurrently(engine, [text for text, _ in prompts], max_tokens)
    out = decode_rate([t.first for t in turns], [t.end for t in turns], [t.done.stats.generated_tokens for t in turns])
    for turn, (_, ids) in zip(turns, prompts, strict=True):
        if turn.done.stats.prompt_tokens != len(ids):
            raise RuntimeError(f"the engine read {turn.done.stats.prompt_tokens} prompt tokens, expected {len(ids)}")
    return {
        **out,
        "ttft_s": [t.first - t.submitted for t in turns],
        "engine_generation_tps": [t.done.stats.generation_tps for t in turns],
        "peak_memory_gb": max(t.done.stats.peak_memory_gb for t in turns),
        "tokens": [t.done.tokens for t in turns],
    }


# ---- theirs: mlx-lm's BatchGenerator ------------------------------------------------------------------


def theirs_decode(model: Any, prompts: list[list[int]], max_tokens: int) -> dict:
    """All prompts inserted at once into a `BatchGenerator` (greedy, no stop tokens), timed as ours."""
    mx.reset_peak_memory()
    gen = BatchGenerator(model, max_tokens=max_tokens)
    try:
        submitted = time.perf_counter()
        uids = gen.insert(prompts)
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        first: dict[int, float] = {}
        end: dict[int, float] = {}
        while len(end) < len(uids):
            _, responses = gen.next()
            now = time.perf_counter()
            for r in responses:
                tokens[r.uid].append(r.token)
                first.setdefault(r.uid, now)
                if r.finish_reason is not None:
                    end[r.uid] = now
    finally:
        gen.close()
    out = decode_rate([first[u] for u in uids], [end[u] for u in uids], [len(tokens[u]) for u in uids])
    return {
        **out,
        "ttft_s": [first[u] - submitted for u in uids],
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "tokens": [tokens[u] for u in uids],
    }


# ---- a new session's first token while 3 others decode ----------------------------------------------


def ttft_idle(engine: Engine, text: str) -> Turn:
    (chat,) = new_sessions(engine, 1, 1)
    return consume(engine, chat, text)


def ttft_busy(engine: Engine, busy_texts: list[str], text: str, busy_tokens: int) -> tuple[Turn, bool]:
    """`text`'s first-token turn, submitted once every session of `busy_texts` decodes; and whether they
    all still decoded when it came."""
    busy = new_sessions(engine, len(busy_texts), busy_tokens)
    (chat,) = new_sessions(engine, 1, 1)
    decoding = [threading.Event() for _ in busy_texts]
    turns: list[Turn | None] = [None] * len(busy_texts)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            turns[i] = consume(engine, busy[i], busy_texts[i], on_first=decoding[i].set)
        except BaseException as e:
            errors.append(e)
            decoding[i].set()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(busy_texts))]
    for t in threads:
        t.start()
    for event in decoding:
        event.wait()
    try:
        turn = consume(engine, chat, text)
    finally:
        for session in busy:
            session.cancel()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    still = all(t is not None and t.end > turn.first for t in turns)
    return turn, still


# ---- batched vs solo ----------------------------------------------------------------------------------


def agreement(solo: list[list[int]], other: list[list[int]]) -> dict:
    """How often `other`'s token sequences equal `solo`'s, and how long their common prefixes are."""
    prefixes = [_common_prefix(a, b) for a, b in zip(solo, other, strict=True)]
    same = [a == b for a, b in zip(solo, other, strict=True)]
    return {
        "sequences": len(same),
        "identical_fraction": sum(same) / len(same) if same else float("nan"),
        "mean_common_prefix": sum(prefixes) / len(prefixes) if prefixes else float("nan"),
        "mean_length": sum(len(a) for a in solo) / len(solo) if solo else float("nan"),
    }


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def batched_tokens(engine: Engine, prompts: list[tuple[str, list[int]]], batch: int, max_tokens: int) -> list:
    """Each prompt's tokens when run with `batch - 1` of the others (wrapping around the list)."""
    out: list[list[int] | None] = [None] * len(prompts)
    for start in range(0, len(prompts), batch):
        idx = [(start + k) % len(prompts) for k in range(min(batch, len(prompts)))]
        turns = run_concurrently(engine, [prompts[i][0] for i in idx], max_tokens)
        for i, turn in zip(idx, turns, strict=True):
            if out[i] is None:
                out[i] = turn.done.tokens
    return out


# ---- the whole benchmark ------------------------------------------------------------------------------


def run(engine: Engine, theirs_model: Any, args: Any) -> dict:
    """Everything above on one engine and one mlx-lm model; a JSON-ready dict."""
    chat = new_sessions(engine, 1, 1)[0]

    def render(text: str) -> list[int]:
        return chat.render([{"role": "user", "content": text}])

    count = max(*args.sessions, 4, args.agree_batch)
    prompts = make_prompts(render, count, args.session_prompt_tokens)
    lengths = [len(ids) for _, ids in prompts]
    log(f"{count} prompts of {sorted(set(lengths))} tokens")
    rounds: dict[int, dict[str, list]] = {n: {"ours": [], "mlx-lm": []} for n in args.sessions}
    ttft: dict[str, list] = {"idle": [], "busy": [], "others_decoding": []}
    for r in range(args.repeats + 1):  # round 0 warms up and is discarded
        tag = " (warm-up)" if r == 0 else ""
        for n in args.sessions:
            group = prompts[:n]
            sides = [
                ("ours", lambda group=group: ours_decode(engine, group, args.max_tokens)),
                ("mlx-lm", lambda group=group: theirs_decode(theirs_model, [ids for _, ids in group], args.max_tokens)),
            ]
            for side, measure in sides if r % 2 else sides[::-1]:
                result = measure()
                if r:
                    rounds[n][side].append(result)
                log(f"round {r}/{args.repeats}{tag}: {n} sessions, {side}: {result['decode_tps']:.1f} tok/s")
        idle = ttft_idle(engine, prompts[3][0])
        busy, still = ttft_busy(engine, [text for text, _ in prompts[:3]], prompts[3][0], args.busy_tokens)
        idle_s, busy_s = idle.first - idle.submitted, busy.first - busy.submitted
        if r:
            ttft["idle"].append(idle_s)
            ttft["busy"].append(busy_s)
            ttft["others_decoding"].append(still)
        log(f"round {r}/{args.repeats}{tag}: first token idle {idle_s:.3f}s, while 3 decode {busy_s:.3f}s")

    log(f"batched vs solo: {count} prompts alone, then in batches of {args.agree_batch}")
    solo = [run_concurrently(engine, [text], args.max_tokens)[0].done.tokens for text, _ in prompts]
    batched = batched_tokens(engine, prompts, args.agree_batch, args.max_tokens)
    return summarize(args, lengths, rounds, ttft, solo, batched)


def summarize(args: Any, lengths: list[int], rounds: dict, ttft: dict, solo: list, batched: list) -> dict:
    decode = {}
    for n, sides in rounds.items():
        ours, theirs = (median([x["decode_tps"] for x in sides[s]]) for s in ("ours", "mlx-lm"))
        decode[str(n)] = {
            "ours_tps": ours,
            "mlx_lm_tps": theirs,
            "ours_over_mlx_lm": ours / theirs if theirs else float("nan"),
            # tokens of every measured round, against the solo tokens of the same prompts
            "agreement_with_solo": {
                s: agreement(solo[:n] * len(sides[s]), [t for x in sides[s] for t in x["tokens"]]) for s in sides
            },
            "runs": {s: [{k: v for k, v in x.items() if k != "tokens"} for x in xs] for s, xs in sides.items()},
        }
    single = decode.get("1", {}).get("ours_tps")
    for entry in decode.values():
        entry["ours_over_ours_1"] = entry["ours_tps"] / single if single else None
    idle, busy = median(ttft["idle"]), median(ttft["busy"])
    return {
        "sessions": list(args.sessions),
        "prompt_tokens": lengths,
        "max_tokens": args.max_tokens,
        "busy_tokens": args.busy_tokens,
        "repeats": args.repeats,
        "decode": decode,
        "scaling_4_over_1": decode["4"]["ours_over_ours_1"] if "4" in decode else None,
        "ttft_under_load": {
            "idle_s": idle,
            "busy_s": busy,
            "ratio": busy / idle if idle else float("nan"),
            "others_still_decoding": all(ttft["others_decoding"]),
            "runs": ttft,
        },
        "agreement": {"batch": args.agree_batch, **agreement(solo, batched)},
    }


def markdown(result: dict) -> str:
    """The summary as Markdown tables."""
    lines = [
        "| sessions | ours decode tok/s | mlx-lm BatchGenerator tok/s | ours / mlx-lm | ours / ours at 1 |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n, d in result["decode"].items():
        scale = f"{d['ours_over_ours_1']:.2f}" if d["ours_over_ours_1"] is not None else "-"
        lines.append(f"| {n} | {d['ours_tps']:.1f} | {d['mlx_lm_tps']:.1f} | {d['ours_over_mlx_lm']:.2f} | {scale} |")
    t, a = result["ttft_under_load"], result["agreement"]
    loaded = t["others_still_decoding"]
    scaling = result["scaling_4_over_1"]
    lines += [
        "",
        "| measurement | value | target |",
        "|---|---:|---|",
        f"| ours, 4 sessions / 1 session | {scaling:.2f}x | >= 2.5x |" if scaling else "| 4 / 1 sessions | - | |",
        f"| first token, idle (s) | {t['idle_s']:.3f} | |",
        f"| first token while 3 sessions decode (s) | {t['busy_s']:.3f} | |",
        f"| while 3 decode / idle | {t['ratio']:.2f}x{'' if loaded else ' (not under load)'} | <= 2x |",
        f"| the 3 still decoding at that first token | {'yes' if loaded else 'no'} | yes |",
        f"| batched ({a['batch']}) == solo, identical sequences | {a['identical_fraction']:.2f} | 1.00 in float32 |",
        f"| mean common prefix (tokens of {a['mean_length']:.0f}) | {a['mean_common_prefix']:.1f} | |",
    ]
    return "\n".join(lines)
