"""Figures for people to look at: labelled image grids and the evaluation's charts.

Every chart takes the metrics dict `plural_diffusion.evaluate.evaluate_policies` writes and
returns PNG bytes (`report.py` embeds them); each policy keeps one colour in every chart.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from reward_models.io import atomic_path

NO_TASTE = "none"  # the taste key of a taste-blind policy's images, everywhere
COLOURS = {"base": "#9ca3af", "mean": "#ea580c", "matched": "#2563eb", "maxmin": "#059669"}
EXTRA_COLOURS = ["#7c3aed", "#db2777", "#0891b2", "#ca8a04", "#4b5563"]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def grid_figure(
    images: torch.Tensor,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    title: str | None = None,
    cell_inches: float = 0.9,
):
    """A matplotlib figure of images [R, C, 3, H, W] in [0, 1] as a labelled grid."""
    plt = pyplot()
    assert images.ndim == 5 and images.shape[2] == 3, images.shape
    rows, cols = images.shape[:2]
    label_inches = 0.0 if not row_labels else min(3.2, 0.3 + 0.07 * max(len(s) for s in row_labels))
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(cols * cell_inches + label_inches + 0.3, rows * cell_inches + 0.6),
        squeeze=False,
    )
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(
                images[r, c].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=8)
            if r == 0 and col_labels:
                ax.set_title(col_labels[c], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    plt = pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def figure_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes (then closed), e.g. to embed in a page."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def save_grid(
    images: torch.Tensor,
    path: Path,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    title: str | None = None,
    cell_inches: float = 0.9,
) -> None:
    """Save images [R, C, 3, H, W] in [0, 1] as a labelled PNG grid (rows x columns)."""
    save_figure(grid_figure(images, row_labels, col_labels, title, cell_inches), path)


def policy_colours(names: list[str]) -> dict[str, str]:
    extra = iter(EXTRA_COLOURS * 4)
    return {n: COLOURS.get(n) or next(extra) for n in names}


def fig_cluster_bars(metrics: dict, key: str, ylabel: str) -> bytes:
    plt = pyplot()
    names, shares = metrics["clusters"]["names"], metrics["clusters"]["shares"]
    policies = list(metrics["policies"])
    colours = policy_colours(policies)
    width = 0.8 / len(policies)
    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(names), 3.4))
    for i, p in enumerate(policies):
        values = [metrics["policies"][p][key][n] for n in names]
        xs = [k + (i - (len(policies) - 1) / 2) * width for k in range(len(names))]
        bars = ax.bar(xs, values, width * 0.92, label=p, color=colours[p])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(len(names)), [f"{n}\n({s:.0%} of raters)" for n, s in zip(names, shares)])
    ax.set_ylabel(ylabel)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(
        frameon=False,
        fontsize=8,
        ncol=len(policies),
        loc="upper center",
        bbox_to_anchor=(0.5, 1.14),
    )
    return figure_png(fig, dpi=110)


def fig_win_rates(metrics: dict, kind: str) -> bytes:
    plt = pyplot()
    names = metrics["clusters"]["names"]
    baseline = metrics["headline"]["baseline"]
    policies = [
        p for p, m in metrics["policies"].items() if p != baseline and kind in m.get("win_rate", {})
    ]
    colours = policy_colours(list(metrics["policies"]))
    width = 0.8 / max(len(policies), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(names), 3.0))
    for i, p in enumerate(policies):
        values = [metrics["policies"][p]["win_rate"][kind][n] for n in names]
        xs = [k + (i - (len(policies) - 1) / 2) * width for k in range(len(names))]
        bars = ax.bar(xs, values, width * 0.92, label=p, color=colours[p])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.axhline(0.5, color="#374151", lw=1, ls="--")
    ax.text(
        -0.5, 0.51, f" as good as {baseline}", fontsize=7, ha="left", va="bottom", color="#374151"
    )
    ax.set_ylim(0, 1.08)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(f"win rate vs {baseline}")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(
        frameon=False,
        fontsize=8,
        ncol=max(len(policies), 1),
        loc="upper center",
        bbox_to_anchor=(0.5, 1.16),
    )
    return figure_png(fig, dpi=110)


def fig_cross_taste(matrix: list[list[float]], names: list[str], label: str) -> bytes:
    plt = pyplot()
    m = torch.tensor(matrix).numpy()
    fig, ax = plt.subplots(figsize=(1.8 + 0.9 * len(names), 1.2 + 0.8 * len(names)))
    im = ax.imshow(m, cmap="Blues")
    for i in range(len(names)):
        for j in range(len(names)):
            bright = m[i, j] > (m.min() + m.max()) / 2
            ax.text(
                j,
                i,
                f"{m[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=9,
                color="white" if bright else "#111827",
                fontweight="bold" if i == j else "normal",
            )
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("scored by (cluster's utility)")
    ax.set_ylabel("generated for")
    fig.colorbar(im, ax=ax, shrink=0.8, label=label)
    return figure_png(fig, dpi=110)


def fig_diversity(metrics: dict) -> bytes:
    plt = pyplot()
    policies = list(metrics["policies"])
    colours = [policy_colours(policies)[p] for p in policies]
    fig, axes = plt.subplots(1, 2, figsize=(2.4 + 1.1 * len(policies), 2.8))
    for ax, key, title in (
        (axes[0], "vendi", "Vendi score (effective number of distinct images)"),
        (axes[1], "mean_pairwise_distance", "mean pairwise CLIP cosine distance"),
    ):
        values = [metrics["policies"][p][key] for p in policies]
        bars = ax.bar(policies, values, color=colours)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
        ax.set_title(title, fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return figure_png(fig, dpi=110)


def fig_overoptimisation(curve: dict, names: list[str], policy: str) -> bytes:
    """One column per cluster: the proxy reward (top) and, where known, the gold utility
    (bottom) of a run's checkpoints, against the training epoch."""
    plt = pyplot()
    rows = [("reward_per_cluster", "proxy reward\n(learned head)", "#7c3aed", "o-")]
    if "gold_per_cluster" in curve:
        rows.append(("gold_per_cluster", "gold utility", "#059669", "s--"))
    fig, axes = plt.subplots(
        len(rows),
        len(names),
        figsize=(1.0 + 2.7 * len(names), 0.6 + 2.0 * len(rows)),
        squeeze=False,
        sharex=True,
    )
    epochs = curve["epochs"]
    for r, (key, label, colour, style) in enumerate(rows):
        for k, name in enumerate(names):
            ax = axes[r][k]
            ax.plot(epochs, curve[key][name], style, color=colour)
            ax.spines[["top", "right"]].set_visible(False)
            if key == "gold_per_cluster":
                ax.set_ylim(0, 1.02)
            if r == 0:
                ax.set_title(name, fontsize=10)
            if r == len(rows) - 1:
                ax.set_xlabel("training epoch")
                ax.set_xticks(epochs)
            if k == 0:
                ax.set_ylabel(label, color=colour)
    fig.suptitle(policy, fontsize=10)
    fig.tight_layout()
    return figure_png(fig, dpi=110)


def fig_gold_vs_diversity(curve: dict, names: list[str], policy: str) -> bytes:
    """The gold-vs-diversity path of a run: mean gold over the clusters (x) against the mean
    within-taste Vendi score (y) at each checkpoint, epochs labelled; epoch 0 is the base."""
    plt = pyplot()
    gold = [sum(v) / len(v) for v in zip(*(curve["gold_per_cluster"][n] for n in names))]
    vendi = curve["vendi_within_taste"]
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    ax.plot(gold, vendi, "o-", color="#2563eb")
    for epoch, x, y in zip(curve["epochs"], gold, vendi):
        ax.annotate(str(epoch), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("gold utility (mean over clusters)")
    ax.set_ylabel("Vendi within a taste (looks)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(bottom=1.0)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(f"{policy}: gold vs diversity along training", fontsize=10)
    fig.tight_layout()
    return figure_png(fig, dpi=110)


def grid_png(rows: list[torch.Tensor], labels: list[str], seeds: list[int], title: str) -> bytes:
    n = min(min(r.shape[0] for r in rows), 8)
    stacked = torch.stack([r[:n] for r in rows])  # [R, n, 3, H, W]
    size = stacked.shape[-1]
    fig = grid_figure(
        stacked,
        labels,
        [f"seed {s}" for s in seeds[:n]],
        title,
        cell_inches=0.85 if size <= 64 else 1.5,
    )
    return figure_png(fig, dpi=100)
