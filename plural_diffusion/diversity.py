"""How varied a set of images is, from their CLIP features: the Vendi score and the mean
pairwise cosine distance. The evaluation reports them; the trainer's expert selection reads the
Vendi score (`select_looks`)."""

from __future__ import annotations

import torch


def vendi_score(features: torch.Tensor) -> float:
    """Vendi score of L2-normalised features [N, D]: the effective number of distinct items,
    exp(entropy of the eigenvalues of the cosine-similarity matrix / N); 1 = all identical."""
    x = torch.nn.functional.normalize(features.double(), dim=1)
    eig = torch.linalg.eigvalsh(x @ x.T / x.shape[0]).clamp(min=0)
    eig = eig[eig > 1e-12]
    return float(torch.exp(-(eig * eig.log()).sum()))


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean cosine distance between distinct items of [N, D] features."""
    x = torch.nn.functional.normalize(features.double(), dim=1)
    n = x.shape[0]
    sim = x @ x.T
    return float((1 - sim).sum() / (n * (n - 1))) if n > 1 else 0.0
