"""The contenders: every recipe of ours, and mlx-lm's quantizers as its own tools run them.

Each contender is a function `make(source, out_dir, data)` that writes one quantized checkpoint. mlx-lm's
calibrated tools normally download their calibration text; here they get the same text as ours, as
512-token windows by default (`Data.calibration`; the length mlx_lm.gptq and mlx_lm.awq use), so no method
sees better data than another.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from quant_recipes.convert import convert
from quant_recipes.recipe import load_recipe, shipped_recipes

OURS = "apertus-mlx"
MLX_LM = "mlx-lm"


@dataclass(frozen=True)
class Data:
    calibration_text: Path  # for our recipes, which cut their own windows from it
    evaluation_text: Path
    calibration: mx.array  # (sequences, length) token ids for mlx-lm's calibrated tools


Make = Callable[[Path, Path, Data], None]


@dataclass(frozen=True)
class Contender:
    name: str  # "<family>/<what>", the key in the results
    family: str
    make: Make


def ours(recipe_name: str) -> Contender:
    def make(source: Path, out: Path, data: Data) -> None:
        # The harness measures every output itself; convert's own report only needs a token of evaluation text.
        convert(source, load_recipe(recipe_name), out, data.calibration_text, data.evaluation_text, eval_sequences=1)

    return Contender(f"{OURS}/{recipe_name}", OURS, make)


def ours_budget(bits_per_weight: float) -> Contender:
    """Our `budget` recipe aimed at `bits_per_weight`."""

    def make(source: Path, out: Path, data: Data) -> None:
        recipe = load_recipe("budget").with_target(bits_per_weight=bits_per_weight)
        convert(source, recipe, out, data.calibration_text, data.evaluation_text, eval_sequences=1)

    return Contender(f"{OURS}/budget@{bits_per_weight:.2f}bpw", OURS, make)


def matched_budgets(sizes: list[float]) -> list[Contender]:
    """Our budget recipe at each of these sizes (bits per weight, rounded down to 0.01, so never above)."""
    return [ours_budget(bpw) for bpw in sorted({math.floor(s * 100) / 100 for s in sizes})]


def mlx_rtn(bits: int, group_size: int) -> Contender:
    def make(source: Path, out: Path, data: Data) -> None:
        from mlx_lm.convert import convert as mlx_convert

        mlx_convert(str(source), str(out), quantize=True, q_bits=bits, q_group_size=group_size)

    return Contender(f"{MLX_LM}/rtn-{bits}-g{group_size}", MLX_LM, make)


def mlx_mixed(predicate: str) -> Contender:
    def make(source: Path, out: Path, data: Data) -> None:
        from mlx_lm.convert import convert as mlx_convert

        mlx_convert(str(source), str(out), quantize=True, q_group_size=64, quant_predicate=predicate)

    return Contender(f"{MLX_LM}/{predicate}", MLX_LM, make)


def mlx_gptq(bits: int, group_size: int = 64) -> Contender:
    def make(source: Path, out: Path, data: Data) -> None:
        from mlx_lm.quant.gptq import gptq_quantize
        from mlx_lm.utils import load, save

        model, tokenizer, config = load(str(source), return_config=True)
        # mlx_lm.gptq sums its Hessians in the model's dtype; from bf16 that breaks it (KL 3.8 at 4 bits on
        # nano, against 0.004 with float32 sums), so it runs on a float32 copy and stores bf16 like the rest.
        model.set_dtype(mx.float32)
        # 6-bit g64 for what GPTQ does not handle (the embedding): mlx_lm.gptq's defaults.
        model, config["quantization"] = gptq_quantize(model, data.calibration, bits, group_size, 6, 64)
        model.set_dtype(mx.bfloat16)
        save(out, source, model, tokenizer, config)

    return Contender(f"{MLX_LM}/gptq-{bits}-g{group_size}", MLX_LM, make)


def apertus_awq_config():
    """mlx-lm ships no AWQ layout for Apertus, so we describe one with its own classes.

    As for Llama, the attention norm's scale absorbs q/k/v's input scaling and the MLP norm's absorbs up_proj's.
    Llama's third pair (up_proj into down_proj) is left out: xIELU between them is not scale-equivariant.
    """
    from mlx_lm.quant.awq import AWQConfig, ScaleConfig

    return AWQConfig(
        embed="embed_tokens",
        lm_head="lm_head",
        no_clip=["q_proj", "k_proj"],
        scale_configs=[
            ScaleConfig(
                block="self_attn", prev="attention_layernorm", layers=["q_proj", "k_proj", "v_proj"], kwargs=["mask"]
            ),
            ScaleConfig(block="mlp", prev="feedforward_layernorm", layers=["up_proj"]),
        ],
    )


def mlx_awq(bits: int, group_size: int = 64) -> Contender:
    def make(source: Path, out: Path, data: Data) -> None:
        from mlx_lm.quant.awq import awq_quantize, update_config
        from mlx_lm.utils import load, save

        model, tokenizer, config = load(str(source), lazy=True, return_config=True)
        # Embedding and head at 4 bits in groups of 32: mlx_lm.awq's defaults.
        awq_quantize(model, data.calibration, apertus_awq_config(), group_size, bits, 32, 4)
        save(out, source, model, tokenizer, update_config(model, config))

    return Contender(f"{MLX_LM}/awq-{bits}-g{group_size}", MLX_LM, make)


def mlx_dwq(bits: int, group_size: int = 64, learning_rate: float = 1e-6) -> Contender:
    def make(source: Path, out: Path, data: Data) -> None:
        import mlx.optimizers as optim
        from mlx_lm.quant.dwq import dwq_quantize
        from mlx_lm.utils import load, quantize_model, save

        model, tokenizer, config = load(str(source), return_config=True)
        student = copy.deepcopy(model)
        _, config = quantize_model(student, config, group_size=group_size, bits=bits)
        rows = [(seq, 0) for seq in data.calibration.tolist()]
        valid, train = rows[: max(4, len(rows) // 16)], rows[max(4, len(rows) // 16) :]
        opt = optim.Adam(learning_rate=learning_rate, bias_correction=True)
        length = data.calibration.shape[1]
        # Batch size 4 and the learning rate are mlx_lm.dwq's defaults; targets are the bf16 model's logits.
        dwq_quantize(student, lambda batch, i, split: model(batch), opt, train, valid, 4, length, seed=123)
        save(out, source, student, tokenizer, config)

    suffix = "" if learning_rate == 1e-6 else f"-lr{learning_rate:g}"
    return Contender(f"{MLX_LM}/dwq-{bits}-g{group_size}{suffix}", MLX_LM, make)


def mlx_dynamic(low: int, high: int, target_bpw: float) -> Contender:
    def make(source: Path, out: Path, data: Data) -> None:
        from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold
        from mlx_lm.utils import load, quantize_model, save

        model, tokenizer, config = load(str(source), return_config=True)
        sensitivities = dict(estimate_sensitivities(model, data.calibration, low, 64, high, 64))
        threshold = estimate_threshold(model, sensitivities, target_bpw, low, 64, high, 64)

        def predicate(path, module):
            if not hasattr(module, "to_quantized"):
                return False
            return {"bits": high, "group_size": 64} if sensitivities[path] > threshold else True

        model, config = quantize_model(model, config, 64, low, quant_predicate=predicate)
        save(out, source, model, tokenizer, config)

    return Contender(f"{MLX_LM}/dynamic-{low}to{high}-{target_bpw:g}bpw", MLX_LM, make)


def all_contenders() -> list[Contender]:
    """Every shipped recipe of ours, then mlx-lm's quantizers over the same range of sizes."""
    contenders = [ours(recipe.name) for recipe in shipped_recipes()]
    contenders += [mlx_rtn(bits, gs) for bits in (2, 3, 4, 5, 6, 8) for gs in (32, 64, 128)]
    contenders += [mlx_mixed(p) for p in ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")]
    for bits in (2, 3, 4):
        # DWQ's default learning rate is set for billions of parameters; a larger one is tried as well.
        contenders += [mlx_gptq(bits), mlx_awq(bits), mlx_dwq(bits), mlx_dwq(bits, learning_rate=1e-4)]
    contenders += [mlx_dynamic(low, low + 1, low + 1.0) for low in (2, 3, 4, 5)]
    return contenders
