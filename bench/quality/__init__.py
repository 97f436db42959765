"""Quality benchmark: every recipe of ours beside mlx-lm's quantizers, on one checkpoint and one held-out text.

    python -m bench.quality --model bench/yardstick/models/small \
        --calibration-text bench/yardstick/data/samples/calibration.txt \
        --eval-text bench/yardstick/data/samples/evaluation.txt --out docs/quality.md

Each contender writes a quantized checkpoint to a scratch directory; every checkpoint is then loaded by
the same loader and measured by the same code against the bf16 original on the same held-out windows,
so the numbers differ only by what the quantizers did.
"""
