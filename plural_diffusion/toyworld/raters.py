"""Gold raters of the toy world: taste clusters whose utilities are functions of pixel statistics.

A rater's utility is an ideal-point bump over four statistics of any RGB image,

    u_r(x) = exp(-sum_j precision_rj * (stat_j(x) - ideal_rj)^2)   in (0, 1],

so every image, generated ones included, has an exact gold score. Raters in a cluster share the
cluster's ideal point up to a small per-rater jitter; clusters conflict (dark vs bright vs vivid).
How a rater *reports* a utility (harsh or generous offset, scale, noise) is separate: see
`ratings.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STATS = ("luminance", "colourfulness", "warmth", "contrast")


def pixel_stats(images: torch.Tensor) -> torch.Tensor:
    """Statistics gold utilities read, [B, 4] in [0, 1], from images [B, 3, H, W] in [0, 1].

    luminance: mean Rec.601 luma; colourfulness: mean (max - min) over channels (0 for grey,
    low for dark colours); warmth: 0.5 + mean(R - B) / 2; contrast: 2 * std of luma (clipped).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    x = images.float().clamp(0, 1)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b  # [B, H, W]
    colourfulness = x.amax(dim=1) - x.amin(dim=1)
    return torch.stack(
        [
            luma.mean(dim=(1, 2)),
            colourfulness.mean(dim=(1, 2)),
            0.5 + (r - b).mean(dim=(1, 2)) / 2,
            (2 * luma.flatten(1).std(dim=1)).clamp(max=1.0),
        ],
        dim=1,
    )


@dataclass
class ClusterSpec:
    """One taste cluster: its name, share of raters, and ideal point over `STATS`."""

    name: str
    share: float
    ideal: list[float]  # per stat, in [0, 1]
    precision: list[float]  # per stat, >= 0; 0 means the cluster does not care


def default_clusters() -> list[ClusterSpec]:
    return [
        ClusterSpec("noir", 0.6, ideal=[0.12, 0.10, 0.5, 0.3], precision=[10.0, 2.0, 0.0, 0.0]),
        ClusterSpec("sunny", 0.3, ideal=[0.85, 0.30, 0.7, 0.3], precision=[10.0, 0.0, 3.0, 0.0]),
        ClusterSpec("vivid", 0.1, ideal=[0.50, 0.75, 0.5, 0.3], precision=[2.0, 10.0, 0.0, 0.0]),
    ]


@dataclass
class GoldRaters:
    """R gold raters: cluster membership and each rater's own ideal point and precisions."""

    cluster_specs: list[ClusterSpec]
    cluster: torch.Tensor  # [R] long, index into cluster_specs
    ideal: torch.Tensor  # [R, S]
    precision: torch.Tensor  # [R, S]
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.cluster.numel())

    @property
    def cluster_names(self) -> list[str]:
        return [c.name for c in self.cluster_specs]

    @property
    def cluster_ideal(self) -> torch.Tensor:  # [K, S]
        return torch.tensor([c.ideal for c in self.cluster_specs])

    @property
    def cluster_precision(self) -> torch.Tensor:  # [K, S]
        return torch.tensor([c.precision for c in self.cluster_specs])


def make_raters(
    n_raters: int,
    clusters: list[ClusterSpec] | None = None,
    jitter: float = 0.04,
    precision_jitter: float = 0.2,
    seed: int = 0,
) -> GoldRaters:
    """`n_raters` raters split over clusters by share (largest remainder), jittered per rater."""
    clusters = clusters or default_clusters()
    shares = torch.tensor([c.share for c in clusters], dtype=torch.float64)
    if (shares <= 0).any():
        raise ValueError("every cluster share must be positive")
    shares = shares / shares.sum()
    counts = torch.floor(shares * n_raters).long()
    remainder = shares * n_raters - counts
    for k in torch.argsort(remainder, descending=True)[: n_raters - int(counts.sum())]:
        counts[k] += 1
    cluster = torch.repeat_interleave(torch.arange(len(clusters)), counts)
    g = torch.Generator().manual_seed(seed)
    base_ideal = torch.tensor([c.ideal for c in clusters])[cluster]
    base_precision = torch.tensor([c.precision for c in clusters])[cluster]
    ideal = (base_ideal + jitter * torch.randn(base_ideal.shape, generator=g)).clamp(0, 1)
    scale = torch.exp(precision_jitter * torch.randn(base_precision.shape, generator=g))
    ids = [f"rater_{i:03d}" for i in range(n_raters)]
    return GoldRaters(clusters, cluster, ideal, base_precision * scale, ids)


def _bump(stats: torch.Tensor, ideal: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    # stats [B, S]; ideal, precision [R, S] -> [B, R]
    d2 = (stats[:, None, :] - ideal[None]) ** 2
    return torch.exp(-(precision[None] * d2).sum(-1))


def gold_utility(images: torch.Tensor, raters: GoldRaters) -> torch.Tensor:
    """Exact utility of each image for each rater, [B, R] in (0, 1]."""
    return _bump(pixel_stats(images), raters.ideal, raters.precision)


def gold_cluster_utility(images: torch.Tensor, raters: GoldRaters) -> torch.Tensor:
    """Utility of each image for each cluster's prototype rater, [B, K] in (0, 1]."""
    return _bump(pixel_stats(images), raters.cluster_ideal, raters.cluster_precision)
