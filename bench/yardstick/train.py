"""Train a yardstick Apertus with transformers' own ApertusForCausalLM, then save and evaluate it.

    python -m bench.yardstick.train --preset nano --device cpu --out apertus_mlx/demo_model
    python -m bench.yardstick.train --preset small --device cuda --data .yardstick_carry/tokens-8192 \
        --out bench/yardstick/models/small

The output folder is a plain Hugging Face checkpoint (config.json, model.safetensors,
generation_config.json, tokenizer files, chat template) plus train_log.jsonl/.txt,
eval.json and a README.md model card.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import ApertusForCausalLM, GenerationConfig

from bench.yardstick.common import DATA_DIR
from bench.yardstick.config_compat import add_compat_keys
from bench.yardstick.presets import PRESETS, Preset


def seed_everything(seed: int) -> None:
    """Same seed for every RNG that touches initialisation or batch order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, preset: Preset) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < preset.warmup_steps:
        return preset.lr * (step + 1) / preset.warmup_steps
    frac = min(1.0, (step - preset.warmup_steps) / max(1, total - preset.warmup_steps))
    return preset.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def batch(ids: np.ndarray, rng: np.random.Generator, b: int, t: int, device: str) -> torch.Tensor:
    """``b`` random windows of ``t`` tokens from the flat stream."""
    starts = rng.integers(0, ids.size - t, size=b)
    x = np.stack([ids[s : s + t] for s in starts]).astype(np.int64)
    return torch.from_numpy(x).to(device, non_blocking=True)


@torch.no_grad()
def quick_heldout_loss(model: torch.nn.Module, held: np.ndarray, preset: Preset, device: str) -> float:
    """Mean loss on a fixed slice of held-out windows: a cheap over-fitting monitor."""
    model.eval()
    t, n = preset.seq_len, min(32, held.size // preset.seq_len)
    x = torch.from_numpy(held[: n * t].astype(np.int64).reshape(n, t)).to(device)
    losses = []
    for chunk in x.split(preset.batch_size):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            losses.append(model(input_ids=chunk, labels=chunk).loss.float().item())
    model.train()
    return float(np.mean(losses))


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """Weight decay on matrices only; norms, xIELU scalars and (tied) embeddings are exempt."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def train(args: argparse.Namespace) -> dict:
    """Run the training loop; return a summary for the model card."""
    preset = PRESETS[args.preset]
    seed_everything(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    data = args.data or DATA_DIR / f"tokens-{preset.vocab_size}"
    ids = np.load(data / "train.npy", mmap_mode="r")
    held = np.load(data / "heldout.npy")
    config = preset.config()
    model = ApertusForCausalLM(config).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=preset.lr, betas=(0.9, 0.95), eps=1e-8)
    step_fn = torch.compile(model) if args.compile else model
    rng = np.random.default_rng(args.seed)
    tokens_per_step = preset.batch_size * preset.seq_len
    budget = args.time_budget if args.time_budget is not None else preset.time_budget_s
    epoch_cap = int(preset.max_epochs * ids.size / tokens_per_step)
    # With no --steps, the step count is fixed after a short calibration so the cosine
    # schedule ends on time; the chosen count is logged so a rerun can pin it with --steps.
    total = args.steps or epoch_cap
    args.out.mkdir(parents=True, exist_ok=True)
    log_j = (args.out / "train_log.jsonl").open("w")
    log_t = (args.out / "train_log.txt").open("w")
    print(f"{args.preset}: {n_params / 1e6:.2f}M params, {ids.size / 1e6:.1f}M train tokens", file=log_t, flush=True)
    t0 = time.time()
    window_t, window_tokens = t0, 0
    step, t10 = 0, t0
    while step < total:
        lr = lr_at(step, total, preset)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch(ids, rng, preset.batch_size, preset.seq_len, args.device)
        try:
            with torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
                loss = step_fn(input_ids=x, labels=x).loss
        except Exception as exc:  # a failed compile must not cost the whole (paid) GPU run
            if step_fn is model:
                raise
            print(f"torch.compile failed ({type(exc).__name__}: {exc}); continuing eagerly", flush=True)
            step_fn = model
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        window_tokens += tokens_per_step
        # Calibrate on steps 10..30 so compilation and warm-up do not skew the estimate.
        if step == 10:
            t10 = time.time()
        if step == 30 and not args.steps:
            per_step = (time.time() - t10) / 20
            total = max(step + 1, min(epoch_cap, step + int((budget - (time.time() - t0)) / per_step)))
        if step % args.log_every == 0 or step == total:
            now = time.time()
            row = {
                "step": step,
                "total_steps": total,
                "loss": round(loss.item(), 4),
                "lr": lr,
                "tokens_per_s": round(window_tokens / (now - window_t)),
                "tokens_seen": step * tokens_per_step,
                "elapsed_s": round(now - t0, 1),
            }
            if step % (args.log_every * 10) == 0 or step == total:
                row["heldout_loss"] = round(quick_heldout_loss(model, held, preset, args.device), 4)
            window_t, window_tokens = now, 0
            log_j.write(json.dumps(row) + "\n")
            log_j.flush()
            line = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            print(line, file=log_t, flush=True)
            print(line, flush=True)
        if time.time() - t0 > budget * 1.15:
            print(f"stopping at step {step}: over the time budget", flush=True)
            break
    elapsed = time.time() - t0
    save(model, args, data)
    return {
        "preset": args.preset,
        "parameters": n_params,
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "train_tokens": int(ids.size),
        "epochs": round(step * tokens_per_step / ids.size, 2),
        "seq_len": preset.seq_len,
        "batch_size": preset.batch_size,
        "peak_lr": preset.lr,
        "train_seconds": round(elapsed, 1),
        "final_loss": round(loss.item(), 4),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "seed": args.seed,
    }


def save(model: ApertusForCausalLM, args: argparse.Namespace, data: Path) -> None:
    """Write a bf16 Hugging Face checkpoint with tokenizer, chat template and provenance."""
    tok_dir = data / "tokenizer"
    eos_ids = [2, json.loads((tok_dir / "tokenizer.json").read_text())["added_tokens"][11]["id"]]
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    add_compat_keys(args.out)
    # Generation stops at </s> or at the end of an assistant turn.
    GenerationConfig(bos_token_id=1, eos_token_id=eos_ids, pad_token_id=3).save_pretrained(args.out)
    for f in tok_dir.iterdir():
        shutil.copy2(f, args.out / f.name)
    shutil.copy2(data / "sources.json", args.out / "sources.json")


def main() -> None:
    """Parse flags, train, evaluate, write the model card."""
    from bench.yardstick.card import write_card
    from bench.yardstick.evaluate import evaluate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="nano")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=None, help="folder from pack.py (default data/tokens-<vocab>)")
    ap.add_argument("--steps", type=int, default=None, help="fixed step count (default: fit the time budget)")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds of training (default: preset's)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    ap.add_argument("--max-shard-size", default="100MB")
    args = ap.parse_args()
    summary = train(args)
    data = args.data or DATA_DIR / f"tokens-{PRESETS[args.preset].vocab_size}"
    results = evaluate(args.out, data, args.device, seq_len=PRESETS[args.preset].seq_len)
    (args.out / "eval.json").write_text(json.dumps({"train": summary, **results}, indent=2, ensure_ascii=False) + "\n")
    write_card(args.out, summary, results)
    print(json.dumps({"heldout_ppl": results["heldout_perplexity"]}))


if __name__ == "__main__":
    main()
