"""`python -m bench.low_rank`: what a rank-r correction buys against wider widths, on the demo model."""

from apertus_mlx.load import DEMO_MODEL
from bench.low_rank import compare


def test_low_rank_corrections_and_wider_widths_are_costed_and_measured():
    rows = {what: (cost, left) for what, cost, left in compare(DEMO_MODEL, (4, 64))}
    assert set(rows) == {"rank-4 correction", "rank-64 correction", "3-bit g32", "4-bit g128"}
    assert rows["3-bit g32"][0] == 0.5 and rows["4-bit g128"][0] == 0.75  # bits plus 32 per group, over 3-bit g64
    # 16-bit factors of (out + in) x r per out x in weights: 16 times the rank's cost per weight.
    assert rows["rank-64 correction"][0] == 16 * rows["rank-4 correction"][0]
    # More rank or more bits leave less error; each strictly less than plain 3-bit g64.
    assert rows["rank-64 correction"][1] < rows["rank-4 correction"][1] < 1
    assert rows["4-bit g128"][1] < rows["3-bit g32"][1] < 1
