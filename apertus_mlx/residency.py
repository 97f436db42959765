"""Keep a model's weights resident in GPU memory on Apple silicon (`mx.set_wired_limit`).

macOS may page out GPU buffers that are not wired; a model whose weights get paged out between tokens decodes
at disk speed. Wiring up to the machine's recommended working set (as mlx-lm does while it generates) keeps them
in. The limit is a ceiling, not an allocation: it costs nothing until buffers are used. Elsewhere (CUDA, CPU)
there is nothing to wire, and this does nothing.
"""

from __future__ import annotations

import logging

import mlx.core as mx
from mlx.utils import tree_flatten

log = logging.getLogger("apertus_mlx.residency")


def wire(model) -> int | None:
    """Wire up to the recommended working set on Metal; returns the previous limit to `unwire`, or None.

    Warns when the weights alone take over 90 % of that working set: the chat will page and be slow.
    """
    if not mx.metal.is_available():
        return None
    limit = int(mx.device_info()["max_recommended_working_set_size"])
    weights = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    if weights > 0.9 * limit:
        log.warning(
            "the model's weights (%.1f GB) nearly fill the GPU's working set (%.1f GB): expect slow answers; "
            "a smaller quantization fits better",
            weights / 1e9,
            limit / 1e9,
        )
    return mx.set_wired_limit(limit)


def unwire(previous: int | None) -> None:
    """Restore the limit `wire` replaced."""
    if previous is not None:
        mx.set_wired_limit(previous)
