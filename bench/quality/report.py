"""Turn measured points into the comparison: Pareto verdicts, a Markdown table, a KL-vs-bits plot, a page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .contenders import MLX_LM, OURS

Point = dict[str, Any]
RANGE = (2.5, 6.5)  # the bits-per-weight span the comparison is judged on
COLORS = {OURS: "#d62728", MLX_LM: "#1f77b4"}


def measured(points: list[Point]) -> list[Point]:
    return [p for p in points if "error" not in p]


def frontier(points: list[Point]) -> list[Point]:
    """Points no other point beats on both size and KL divergence, by increasing bits per weight."""
    best, out = float("inf"), []
    for p in sorted(measured(points), key=lambda p: (p["bits_per_weight"], p["kl_divergence"])):
        if p["kl_divergence"] < best:
            best = p["kl_divergence"]
            out.append(p)
    return out


def verdicts(points: list[Point], span: tuple[float, float] = RANGE) -> list[dict[str, Any]]:
    """For each point of mlx-lm's frontier within `span`: our best KL at equal or fewer bits, and who wins."""
    ours = [p for p in measured(points) if p["family"] == OURS]
    rows = []
    for theirs in frontier([p for p in points if p["family"] == MLX_LM]):
        if not span[0] <= theirs["bits_per_weight"] <= span[1]:
            continue
        fits = [p for p in ours if p["bits_per_weight"] <= theirs["bits_per_weight"] + 1e-9]
        mine = min(fits, key=lambda p: p["kl_divergence"], default=None)
        wins = mine is not None and mine["kl_divergence"] < theirs["kl_divergence"]
        rows.append({"mlx_lm": theirs, "ours": mine, "ours_wins": wins})
    return rows


def _kl_ratio(row: dict[str, Any]) -> str:
    return f"{row['ours']['kl_divergence'] / row['mlx_lm']['kl_divergence']:.2f}x" if row["ours"] else "-"


def verdict_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| mlx-lm (its frontier) | bpw | KL | ours, best at <= bpw | bpw | KL | KL ours / theirs | verdict |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        t, o = r["mlx_lm"], r["ours"]
        mine = (
            f"`{o['name'].split('/', 1)[1]}` | {o['bits_per_weight']:.3f} | {o['kl_divergence']:.4f}"
            if o
            else "none | - | -"
        )
        verdict = "ours better" if r["ours_wins"] else "**NOT beaten**"
        lines.append(
            f"| `{t['name'].split('/', 1)[1]}` | {t['bits_per_weight']:.3f} | {t['kl_divergence']:.4f} | "
            f"{mine} | {_kl_ratio(r)} | {verdict} |"
        )
    return "\n".join(lines)


def points_table(points: list[Point]) -> str:
    on_frontier = {p["name"] for family in (OURS, MLX_LM) for p in frontier(_family(points, family))}
    lines = [
        "| contender | bpw | size MB | KL (nats/token) | top-1 | perplexity | time s | frontier |",
        "|---|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for p in sorted(measured(points), key=lambda p: (p["bits_per_weight"], p["kl_divergence"])):
        lines.append(
            f"| `{p['name']}` | {p['bits_per_weight']:.3f} | {p['size_bytes'] / 1e6:.1f} | "
            f"{p['kl_divergence']:.4f} | {100 * p['top1_agreement']:.1f}% | {p['perplexity_quantized']:.3f} | "
            f"{p['conversion_seconds']:.1f} | {'*' if p['name'] in on_frontier else ''} |"
        )
    for p in points:
        if "error" in p:
            lines.append(f"| `{p['name']}` | failed: {p['error']} | | | | | | |")
    return "\n".join(lines)


def _family(points: list[Point], family: str) -> list[Point]:
    return [p for p in points if p["family"] == family]


def plot(points: list[Point], path: Path, title: str) -> None:
    """KL divergence against bits per weight (log scale), one series and one frontier line per family."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI or servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    ax.axvspan(*RANGE, color="0.94", zorder=0, label=f"judged range ({RANGE[0]}-{RANGE[1]} bpw)")
    for family, marker in ((MLX_LM, "x"), (OURS, "o")):
        pts = measured(_family(points, family))
        if not pts:
            continue
        ax.scatter(
            [p["bits_per_weight"] for p in pts],
            [p["kl_divergence"] for p in pts],
            marker=marker,
            color=COLORS[family],
            alpha=0.6,
            label=family,
        )
        front = frontier(pts)
        ax.step(
            [p["bits_per_weight"] for p in front],
            [p["kl_divergence"] for p in front],
            where="post",
            color=COLORS[family],
            linewidth=1.2,
            label=f"{family} frontier",
        )
        for p in front:
            ax.annotate(
                p["name"].split("/", 1)[1],
                (p["bits_per_weight"], p["kl_divergence"]),
                fontsize=6,
                color=COLORS[family],
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (scales and biases included)")
    ax.set_ylabel("KL divergence to bf16 (nats/token, log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def page(results: dict[str, Any], plot_name: str) -> str:
    """The whole Markdown report: set-up, verdicts, plot, every point."""
    points, setup = results["points"], results["setup"]
    rows = verdicts(points)
    beaten = sum(r["ours_wins"] for r in rows)
    failed = [p["name"] for p in points if "error" in p]
    summary = (
        f"Of mlx-lm's {len(rows)} Pareto-optimal points between {RANGE[0]} and {RANGE[1]} bits per weight, "
        f"ours has a lower KL divergence at equal or fewer bits for **{beaten}**"
        + ("." if beaten == len(rows) else f"; **{len(rows) - beaten} are not beaten yet** (marked below).")
    )
    return (
        "\n\n".join(
            [
                f"# Quantization quality: `{setup['model_name']}`",
                f"_Generated by `{setup['command']}`; do not edit by hand._",
                (
                    f"Model: `{setup['model']}` ({setup['parameters'] / 1e6:.1f}M parameters, bf16). "
                    f"Evaluation: {setup['evaluation_tokens']} next-token predictions on `{setup['evaluation_text']}` "
                    f"({setup['evaluation_sequences']} windows of {setup['sequence_length']} tokens), which no recipe "
                    f"is calibrated or tuned on. Calibration: `{setup['calibration_text']}`; mlx-lm's calibrated tools "
                    f"get {setup['calibration_sequences']} windows of {setup['calibration_length']} tokens of it, our "
                    f"recipes the windows their files ask for. Versions: {setup['versions']}. "
                    f"Device: {setup['device']}."
                ),
                "KL divergence is KL(bf16 || quantized) of next-token distributions, averaged over tokens; bits per "
                "weight count every stored byte (packed weights, scales, biases, norms) per original parameter.",
                f"## Verdict\n\n{summary}\n\n{verdict_table(rows)}",
                f"![KL divergence against bits per weight]({plot_name})",
                f"## Every point\n\n{points_table(points)}",
                *([f"Failed to run: {', '.join(failed)}."] if failed else []),
            ]
        )
        + "\n"
    )
