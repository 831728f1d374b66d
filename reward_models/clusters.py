"""Taste clusters: group raters by their learned taste vectors, one centroid taste per group.

    clusters = fit_clusters(head.rater_tastes(), ClusterConfig(n_clusters=None))  # k by BIC
    clusters.score(head, features, cluster="cluster_1")      # [B], the cluster's utility
    clusters.save("runs/clusters"); TasteClusters.load("runs/clusters")

Each cluster k has a centroid taste z_k (the mixture component's mean, or the k-means centre),
a share (the fraction of raters assigned to it) and a name ("cluster_k" unless a naming callback
gives a better one, e.g. from the images the centroid scores highest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from reward_models.errors import UserError
from reward_models.heads import RewardHead
from reward_models.io import atomic_dir, load_tensors, read_json, save_tensors, write_json

CLUSTERS_JSON = "clusters.json"
CENTROIDS_NAME = "centroids.safetensors"

# name_fn(k, centroid [d], member rater indices [n_k]) -> a unique, human-readable name
NameFn = Callable[[int, torch.Tensor, torch.Tensor], str]


@dataclass
class ClusterConfig:
    n_clusters: int | None = None  # None: the k in 1..max_clusters with the lowest GMM BIC
    max_clusters: int = 8
    method: Literal["gmm", "kmeans"] = "gmm"
    # "spherical" or "diag" keep the parameter count, and so BIC's penalty, honest for tens of
    # raters in 8+ dims, where "full" covariances overfit
    covariance_type: Literal["spherical", "diag", "tied", "full"] = "diag"
    n_init: int = 5
    seed: int = 0


@dataclass
class TasteClusters:
    """K clusters over R raters' taste vectors."""

    centroids: torch.Tensor  # [K, d] float
    shares: torch.Tensor  # [K] float, sums to 1
    labels: torch.Tensor  # [R] long: cluster of each rater
    names: list[str]
    bic: dict[int, float] = field(default_factory=dict)  # k -> BIC, when k was chosen by BIC

    def __len__(self) -> int:
        return self.centroids.shape[0]

    @property
    def taste_dim(self) -> int:
        return self.centroids.shape[1]

    def index(self, cluster: int | str) -> int:
        """Cluster index from an index or a name."""
        if isinstance(cluster, str):
            if cluster not in self.names:
                raise UserError(f"unknown cluster {cluster!r} (known: {', '.join(self.names)})")
            return self.names.index(cluster)
        if not 0 <= cluster < len(self):
            raise UserError(f"cluster index {cluster} out of range: there are {len(self)} clusters")
        return int(cluster)

    def taste(self, cluster: int | str) -> torch.Tensor:
        """Centroid taste z_k [d] of a cluster given by index or name."""
        return self.centroids[self.index(cluster)]

    def score(self, head: RewardHead, features: torch.Tensor, cluster: int | str) -> torch.Tensor:
        """Utility of each image for the cluster's centroid taste: features [B, D] -> [B]."""
        self._check_head(head)
        z = self.taste(cluster).to(features.device, features.dtype)
        return head.score(features, z.expand(features.shape[0], -1))

    def score_all(self, head: RewardHead, features: torch.Tensor) -> torch.Tensor:
        """Utility of each image for every cluster: features [B, D] -> [B, K]."""
        return torch.stack([self.score(head, features, k) for k in range(len(self))], dim=1)

    def _check_head(self, head: RewardHead) -> None:
        if head.taste_dim != self.taste_dim:
            raise UserError(
                f"clusters hold {self.taste_dim}-dim tastes but the {head.kind} head takes "
                f"{head.taste_dim}-dim tastes; fit the clusters on this head's rater tastes"
            )

    def save(self, directory: str | Path) -> None:
        """Write clusters.json and centroids.safetensors to `directory`, atomically."""
        record = {
            "names": self.names,
            "shares": self.shares.tolist(),
            "labels": self.labels.tolist(),
            "bic": {str(k): v for k, v in self.bic.items()},
        }
        with atomic_dir(directory) as tmp:
            write_json(tmp / CLUSTERS_JSON, record)
            save_tensors(tmp / CENTROIDS_NAME, {"centroids": self.centroids})

    @classmethod
    def load(cls, directory: str | Path) -> TasteClusters:
        directory = Path(directory)
        record = read_json(directory / CLUSTERS_JSON)
        centroids = load_tensors(directory / CENTROIDS_NAME).get("centroids")
        missing = [k for k in ("names", "shares", "labels") if k not in record]
        if centroids is None or missing or len(record["names"]) != centroids.shape[0]:
            raise UserError(
                f"{directory}: not a taste-clusters directory (missing {missing or 'centroids'} "
                "or names/centroids disagree); save it again with TasteClusters.save"
            )
        return cls(
            centroids=centroids,
            shares=torch.tensor(record["shares"], dtype=torch.float32),
            labels=torch.tensor(record["labels"], dtype=torch.long),
            names=list(record["names"]),
            bic={int(k): float(v) for k, v in record.get("bic", {}).items()},
        )


def _gmm(x: np.ndarray, k: int, cfg: ClusterConfig) -> GaussianMixture:
    return GaussianMixture(
        n_components=k,
        covariance_type=cfg.covariance_type,
        n_init=cfg.n_init,
        random_state=cfg.seed,
    ).fit(x)


def gmm_by_bic(
    x: np.ndarray, max_components: int, cfg: ClusterConfig
) -> tuple[GaussianMixture, dict[int, float]]:
    """The Gaussian mixture over points x [N, d] whose K in 1..min(max_components, N - 1) has
    the lowest BIC, and the BIC of every K tried."""
    # a k-component mixture needs > k points to have a finite likelihood; k=1 always fits
    fits = {k: _gmm(x, k, cfg) for k in range(1, max(1, min(max_components, len(x) - 1)) + 1)}
    bic = {k: float(model.bic(x)) for k, model in fits.items()}
    return fits[min(bic, key=bic.get)], bic


def fit_clusters(
    tastes: torch.Tensor,
    cfg: ClusterConfig | None = None,
    name_fn: NameFn | None = None,
) -> TasteClusters:
    """Cluster raters' taste vectors [R, d] (e.g. `RaterHead.rater_tastes()`) into K groups.

    With `cfg.n_clusters=None`, K minimises the Bayesian information criterion of a Gaussian
    mixture over 1..min(max_clusters, R - 1). Raises UserError when K > R or a cluster is empty.
    """
    cfg = cfg or ClusterConfig()
    if tastes.ndim != 2 or tastes.shape[0] == 0 or not torch.isfinite(tastes).all():
        raise UserError(
            f"tastes must be a finite [R >= 1, d] matrix, got shape {tuple(tastes.shape)}"
        )
    n_raters = tastes.shape[0]
    x = tastes.detach().double().cpu().numpy()

    bic: dict[int, float] = {}
    k, model = cfg.n_clusters, None
    if k is None:
        model, bic = gmm_by_bic(x, cfg.max_clusters, cfg)
        k = model.n_components
    if not 1 <= k <= n_raters:
        raise UserError(
            f"cannot make {k} taste clusters from {n_raters} raters; ask for 1..{n_raters}"
        )

    if cfg.method == "gmm":
        if model is None:  # else the mixture BIC chose, already fitted
            model = _gmm(x, k, cfg)
        labels, centroids = model.predict(x), model.means_
    else:
        model = KMeans(n_clusters=k, n_init=cfg.n_init, random_state=cfg.seed).fit(x)
        labels, centroids = model.labels_, model.cluster_centers_
    counts = np.bincount(labels, minlength=k)
    if (counts == 0).any():
        empty = int(np.flatnonzero(counts == 0)[0])
        raise UserError(
            f"taste cluster {empty} of {k} got no raters; ask for fewer clusters "
            "(or n_clusters=None to choose by BIC)"
        )

    # largest cluster first, so cluster_0 is the majority taste whatever sklearn's order
    order = np.argsort(-counts, kind="stable")
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    labels = torch.from_numpy(remap[labels]).long()
    centroids = torch.from_numpy(centroids[order]).float()
    shares = torch.from_numpy(counts[order] / n_raters).float()

    names = [f"cluster_{j}" for j in range(k)]
    if name_fn is not None:
        names = [
            str(name_fn(j, centroids[j], torch.nonzero(labels == j).flatten())) for j in range(k)
        ]
        if len(set(names)) != k:
            raise UserError(
                f"cluster naming callback gave duplicate names {names}; names must be unique"
            )
    return TasteClusters(centroids=centroids, shares=shares, labels=labels, names=names, bic=bic)
