"""Budget recipes: choose each module's width (bits and group size) from its measured sensitivity to fit a target.

Sensitivity is the KL divergence of next-token distributions that rounding a module to a width adds, on
calibration text. For the head it is measured exactly. For a decoder layer's projection it is the share of
the residual stream that the rounding changes at the layer's output, times that point's gain: the KL a
small random change of that relative size, injected there, causes at the output. The embedding is the
residual stream before the first layer. Each module's widths are reduced to the lower convex hull of
(bytes, KL), the ones no mix of its other widths beats; a greedy allocation then starts every module at
its smallest width and repeatedly takes the step along a hull whose KL drops most per extra byte, while
the total stays within the budget.
"""

from __future__ import annotations

import heapq
from dataclasses import replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from apertus_mlx.errors import ConfigError
from apertus_mlx.model_info import RUNTIME_OVERHEAD, USABLE_RAM

from .methods import METHODS, Target
from .pipeline import Plan, Progress, layer_linears, packed_bytes, run_layer
from .recipe import Assignment, Budget, layer_index

Width = tuple[int, int]  # (bits, group_size)
Errors = dict[str, dict[Width, float]]

EMBED, HEAD = "model.embed_tokens", "lm_head"
HEAD_ROWS = 1024  # final hidden states used for the head: its logits are the largest product measured
SAMPLE_SEQUENCES = 4  # calibration windows each decoder layer is re-run on, once per projection and width
ROW_BLOCK = 8192  # weight rows dequantized at a time, so a 131k-row head never sits in float32 whole
TOKEN_BLOCK = 128  # rows of logits at a time: 128 x 131k float32 is 67 MB
PROBE = 3e-2  # relative RMS of the random change injected to measure a point's gain: small, yet far above bf16's


def target_bytes(budget: Budget, parameters: int, kv_bytes_per_token: int) -> float:
    """The budget as bytes of weights."""
    if budget.bits_per_weight is not None:
        return budget.bits_per_weight * parameters / 8
    if budget.size_gb is not None:
        return budget.size_gb * 1e9
    return USABLE_RAM * budget.ram_gb * 1e9 - kv_bytes_per_token * budget.context - RUNTIME_OVERHEAD


def measure_sensitivity(
    model: Any, plan: Plan, calibration: mx.array, widths: tuple[Width, ...], progress: Progress | None = None
) -> Errors:
    """The KL divergence each budgeted module adds at each width.

    Consumes `model`'s layers to bound memory. A decoder layer's projections are judged by what reaches the
    residual stream: the layer is run with one projection rounded, and the change of its output is taken
    relative to that output. That share becomes KL through the gain of the layer's output (see the module's
    docstring): probes, copies of the sample with a random change injected after the embedding and after
    each layer, travel along with the sample, and their KL at the output over the change's energy is the gain.

    The embedding is measured on the rows the calibration text looks up, which are the residual stream
    at its start, and the head on its logits from the final hidden states. A tied embedding is one tensor
    in both roles, so its two errors add up.
    """
    inner = model.model
    embed = inner.embed_tokens
    hidden = embed.weight.shape[1]
    shares: Errors = {}  # of the residual stream, before gains
    if plan[EMBED].quantized:
        shares[EMBED] = _lookup_errors(embed.weight, calibration, plan[EMBED], _fitting(widths, hidden, EMBED))
    h = embed(calibration)
    # probes[k] is the sample changed after layer k - 1 (probes[0]: after the embedding).
    probes = [_probe(h[:SAMPLE_SEQUENCES], mx.random.key(0))]
    layers = range(len(model.layers))
    for i in progress(layers, "measuring sensitivity", len(layers)) if progress else layers:
        layer, prefix = model.layers[i], f"model.layers.{i}"
        sample = h[:SAMPLE_SEQUENCES]
        for path, linear in layer_linears(layer, prefix).items():
            if plan[path].quantized:
                fitting = _fitting(widths, linear.weight.shape[1], path)
                shares[path] = _residual_errors(layer, linear, sample, plan[path], fitting)
        h = run_layer(layer, h)
        probes = [run_layer(layer, p) for p in probes]
        probes.append(_probe(h[:SAMPLE_SEQUENCES], mx.random.key(i + 1)))
        inner.layers[i] = None  # release this layer's weights
    head = embed.as_linear if model.args.tie_word_embeddings else model.lm_head
    clean = inner.norm(h[:SAMPLE_SEQUENCES])
    gains = [_kl(head, clean, inner.norm(p)) / PROBE**2 for p in probes]

    errors: Errors = {}
    for path, by_width in shares.items():
        index = layer_index(path)
        gain = gains[0] if index is None else gains[index + 1]  # the embedding, or a projection's layer
        errors[path] = {w: gain * e for w, e in by_width.items()}
    final = inner.norm(h).reshape(-1, h.shape[-1])[:HEAD_ROWS]
    fitting = _fitting(widths, hidden, HEAD)
    if model.args.tie_word_embeddings:
        if plan[EMBED].quantized:
            as_head = _head_errors(final, embed.weight, plan[EMBED], fitting)
            errors[EMBED] = {w: errors[EMBED][w] + as_head[w] for w in fitting}
    elif plan[HEAD].quantized:
        errors[HEAD] = _head_errors(final, model.lm_head.weight, plan[HEAD], fitting)
    return errors


def _fitting(widths: tuple[Width, ...], inputs: int, path: str) -> tuple[Width, ...]:
    """The widths whose group size divides a module's input width."""
    fitting = tuple(w for w in widths if inputs % w[1] == 0)
    if not fitting:
        raise ConfigError(f"{path}: no budget group size divides its {inputs} inputs")
    return fitting


def _probe(x: mx.array, key: mx.array) -> mx.array:
    """`x` with a random change of relative RMS `PROBE` per token."""
    x32 = x.astype(mx.float32)
    rms = mx.sqrt((x32 * x32).mean(axis=-1, keepdims=True))
    changed = (x32 + PROBE * rms * mx.random.normal(x.shape, key=key)).astype(x.dtype)
    mx.eval(changed)
    return changed


def _kl(head: Any, original: mx.array, changed: mx.array, changed_head: Any = None) -> float:
    """Mean KL(softmax(head(original)) || softmax(changed_head(changed))) over the positions of (..., hidden)."""
    changed_head = changed_head or head
    original, changed = original.reshape(-1, original.shape[-1]), changed.reshape(-1, changed.shape[-1])
    total = 0.0
    for start in range(0, original.shape[0], TOKEN_BLOCK):
        lp = nn.log_softmax(head(original[start : start + TOKEN_BLOCK]).astype(mx.float32), axis=-1)
        lq = nn.log_softmax(changed_head(changed[start : start + TOKEN_BLOCK]).astype(mx.float32), axis=-1)
        total += (mx.exp(lp) * (lp - lq)).sum().item()
    return total / original.shape[0]


def _rounded(w: mx.array, assignment: Assignment, width: Width) -> mx.array:
    target = Target(*width, assignment.mode)
    q = METHODS["rtn"](w, target, None)
    return mx.dequantize(q.weight, q.scales, q.biases, target.group_size, target.bits, mode=target.mode)


def _residual_errors(
    layer: Any, linear: Any, h: mx.array, assignment: Assignment, widths: tuple[Width, ...]
) -> dict[Width, float]:
    """||layer(h) with `linear` rounded - layer(h)||^2 / ||layer(h)||^2 for each width."""
    reference = run_layer(layer, h).astype(mx.float32)
    energy = (reference * reference).sum().item() or 1.0
    weight = linear.weight
    errors = {}
    try:
        for width in widths:
            linear.weight = _rounded(weight.astype(mx.float32), assignment, width).astype(weight.dtype)
            diff = run_layer(layer, h).astype(mx.float32) - reference
            errors[width] = (diff * diff).sum().item() / energy
    finally:
        linear.weight = weight
    return errors


def _head_errors(x: mx.array, weight: mx.array, assignment: Assignment, widths) -> dict[Width, float]:
    """KL between the head's next-token distributions from final states `x` with `weight` and rounded, per width."""
    errors = {}
    for width in widths:
        blocks = range(0, weight.shape[0], ROW_BLOCK)
        rounded = [_rounded(weight[s : s + ROW_BLOCK].astype(mx.float32), assignment, width) for s in blocks]
        rounded = mx.concatenate([r.astype(weight.dtype) for r in rounded])
        errors[width] = _kl(lambda v: v @ weight.T, x, x, lambda v, r=rounded: v @ r.T)
    return errors


def _lookup_errors(weight: mx.array, tokens: mx.array, assignment: Assignment, widths) -> dict[Width, float]:
    """Relative error of the embedding rows the tokens look up (groups run along rows, so rows quantize alone)."""
    ids, counts = np.unique(np.array(tokens).reshape(-1), return_counts=True)
    rows = weight[mx.array(ids)].astype(mx.float32)
    weights = mx.array(counts.astype(np.float32))[:, None]
    norm = (weights * rows * rows).sum().item() or 1.0
    errors = {}
    for width in widths:
        diff = rows - _rounded(rows, assignment, width)
        errors[width] = (weights * diff * diff).sum().item() / norm
    return errors


def allocate(plan: Plan, shapes: dict[str, tuple[int, int]], errors: Errors, budget_bytes: float) -> Plan:
    """Widen the budgeted modules greedily, best error reduction per byte first, within `budget_bytes`."""
    fixed = sum(packed_bytes(shapes[p], a) for p, a in plan.items() if p not in errors)
    hulls = {p: _hull(shapes[p], plan[p], by_width) for p, by_width in errors.items()}
    step = dict.fromkeys(hulls, 0)
    total = fixed + sum(hull[0][0] for hull in hulls.values())
    if total > budget_bytes:
        narrowest = min(w for by_width in errors.values() for w in by_width)
        raise ConfigError(
            f"the budget of {budget_bytes / 1e9:.4f} GB cannot be met: even {narrowest[0]}-bit layers in groups of "
            f"{narrowest[1]} need {total / 1e9:.4f} GB"
        )
    heap: list[tuple[float, str]] = []

    def push(path: str) -> None:
        hull, k = hulls[path], step[path]
        if k + 1 < len(hull):
            (size, error, _), (wider, lower, _) = hull[k], hull[k + 1]
            heapq.heappush(heap, ((lower - error) / (wider - size), path))

    for path in hulls:
        push(path)
    while heap:
        _, path = heapq.heappop(heap)
        hull, k = hulls[path], step[path]
        extra = hull[k + 1][0] - hull[k][0]
        if total + extra <= budget_bytes:
            total += extra
            step[path] = k + 1
            push(path)
    chosen = {p: hulls[p][step[p]][2] for p in hulls}
    return {p: replace(a, bits=chosen[p][0], group_size=chosen[p][1]) if p in chosen else a for p, a in plan.items()}


def _hull(
    shape: tuple[int, int], assignment: Assignment, by_width: dict[Width, float]
) -> list[tuple[int, float, Width]]:
    """(bytes, error, width) of the widths on the lower convex hull, smallest first.

    A width off the hull is beaten by a mix of its neighbours at the same bytes, so the greedy never needs it;
    on the hull, each step's error drop per byte is smaller than the one before, which makes greedy steps sound.
    """
    points = sorted(
        (packed_bytes(shape, replace(assignment, bits=b, group_size=g)), e, (b, g)) for (b, g), e in by_width.items()
    )
    hull: list[tuple[int, float, Width]] = []
    for point in points:
        if hull and point[1] >= hull[-1][1]:
            continue  # more bytes and no less error
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], point):
            hull.pop()
        hull.append(point)
    return hull


def _slope(a: tuple[int, float, Width], b: tuple[int, float, Width]) -> float:
    return (b[1] - a[1]) / (b[0] - a[0])


def assignments_summary(plan: Plan) -> dict[str, int]:
    """How many modules got each width (`fp` for full precision)."""
    counts: dict[str, int] = {}
    for a in plan.values():
        key = f"{a.bits}-bit g{a.group_size}" if isinstance(a, Assignment) and a.quantized else "fp"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
