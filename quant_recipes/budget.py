"""Budget recipes: choose each layer's bit width from its measured sensitivity to fit a size target.

Sensitivity is the relative output error ||X (W - Q_b(W))^T||^2 / ||X W^T||^2 of every linear layer
at every candidate width b, on its real calibration inputs X. A greedy allocation then starts every
layer at the narrowest width and repeatedly widens the layer whose error drops most per extra byte,
while the total stays within the budget.
"""

from __future__ import annotations

import heapq
from dataclasses import replace
from typing import Any

import mlx.core as mx

from apertus_mlx.errors import ConfigError

from .methods import METHODS, Target
from .pipeline import Plan, Progress, collect_stats, layer_linears, packed_bytes, run_layer
from .recipe import Assignment, Budget

USABLE_RAM = 0.66  # the share of a Mac's memory the GPU may wire by default
RUNTIME_OVERHEAD = 0.5e9  # activations, buffers, the app itself


def target_bytes(budget: Budget, parameters: int, kv_bytes_per_token: int) -> float:
    """The budget as bytes of weights."""
    if budget.bits_per_weight is not None:
        return budget.bits_per_weight * parameters / 8
    if budget.size_gb is not None:
        return budget.size_gb * 1e9
    return USABLE_RAM * budget.ram_gb * 1e9 - kv_bytes_per_token * budget.context - RUNTIME_OVERHEAD


def measure_sensitivity(
    model: Any, plan: Plan, calibration: mx.array, choices: tuple[int, ...], progress: Progress | None = None
) -> dict[str, dict[int, float]]:
    """Relative output error of each budgeted linear at each width. Consumes `model`'s layers to bound memory."""
    errors: dict[str, dict[int, float]] = {}
    h = model.model.embed_tokens(calibration)
    layers = range(len(model.layers))
    for i in progress(layers, "measuring sensitivity", len(layers)) if progress else layers:
        layer, prefix = model.layers[i], f"model.layers.{i}"
        stats = collect_stats(layer, prefix, h, want_hessian=False)
        for path, linear in layer_linears(layer, prefix).items():
            if not plan[path].quantized:
                continue
            x = stats[path].sample
            w = linear.weight.astype(mx.float32)
            reference = x @ w.T
            norm = (reference * reference).sum().item() or 1.0
            errors[path] = {}
            for bits in choices:
                target = Target(bits, plan[path].group_size, plan[path].mode)
                q = METHODS["rtn"](w, target, None)
                w_hat = mx.dequantize(q.weight, q.scales, q.biases, target.group_size, target.bits, mode=target.mode)
                diff = x @ (w - w_hat).T
                errors[path][bits] = (diff * diff).sum().item() / norm
        h = run_layer(layer, h)
        model.model.layers[i] = None  # release this layer's weights
    return errors


def allocate(
    plan: Plan,
    modules: dict[str, Any],
    errors: dict[str, dict[int, float]],
    budget_bytes: float,
    choices: tuple[int, ...],
) -> Plan:
    """Widen the budgeted layers greedily, best error reduction per byte first, within `budget_bytes`."""
    fixed = sum(packed_bytes(modules[p], a) for p, a in plan.items() if p not in errors)
    bits = {p: choices[0] for p in errors}
    size = {p: packed_bytes(modules[p], replace(plan[p], bits=choices[0])) for p in errors}
    total = fixed + sum(size.values())
    if total > budget_bytes:
        raise ConfigError(
            f"the budget of {budget_bytes / 1e9:.3f} GB cannot be met: even {choices[0]}-bit layers "
            f"need {total / 1e9:.3f} GB"
        )
    heap: list[tuple[float, str, int]] = []

    def push(path: str) -> None:
        k = choices.index(bits[path])
        if k + 1 < len(choices):
            wider = choices[k + 1]
            extra = packed_bytes(modules[path], replace(plan[path], bits=wider)) - size[path]
            gain = errors[path][bits[path]] - errors[path][wider]
            heapq.heappush(heap, (-gain / max(extra, 1), path, wider))

    for path in errors:
        push(path)
    while heap:
        _, path, wider = heapq.heappop(heap)
        new_size = packed_bytes(modules[path], replace(plan[path], bits=wider))
        if total - size[path] + new_size <= budget_bytes:
            total += new_size - size[path]
            bits[path], size[path] = wider, new_size
            push(path)
    return {p: replace(a, bits=bits[p]) if p in bits else a for p, a in plan.items()}


def assignments_summary(plan: Plan) -> dict[str, int]:
    """How many modules got each width (`fp` for full precision)."""
    counts: dict[str, int] = {}
    for a in plan.values():
        key = f"{a.bits}-bit" if isinstance(a, Assignment) and a.quantized else "fp"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
