"""Image grids with labels, for people to look at."""

from __future__ import annotations

from pathlib import Path

import torch

from reward_models.io import atomic_path


def save_grid(
    images: torch.Tensor,
    path: Path,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    title: str | None = None,
    cell_inches: float = 0.9,
) -> None:
    """Save images [R, C, 3, H, W] in [0, 1] as a labelled PNG grid (rows x columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert images.ndim == 5 and images.shape[2] == 3, images.shape
    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(cols * cell_inches + 1.6, rows * cell_inches + 0.6),
        squeeze=False,
    )
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[r, c].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=8)
            if r == 0 and col_labels:
                ax.set_title(col_labels[c], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
