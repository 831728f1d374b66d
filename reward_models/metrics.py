"""How well a head ranks images for a rater, per rater and per taste cluster.

Ranking metrics, not MSE: a head is judged on whether it orders images the way the rater would,
which is what RL fine-tuning consumes. Aggregates go rater -> cluster -> worst cluster, so a
head that serves the majority and fails a minority shows it in one number.

    report = by_rater(pred, gold, rater, rater_cluster)   # pred, gold, rater [N]; rater_cluster [R]
    report.per_cluster, report.worst_cluster, report.worst_value

`reward_models.workflow.evaluate` reports every head through `by_rater`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import adjusted_rand_score

ArrayLike = torch.Tensor | np.ndarray | list

Metric = Callable[[ArrayLike, ArrayLike], float]


def _vector(x: ArrayLike) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.from_numpy(np.array(x, dtype=np.float64))  # a copy: x may be read-only
    return x.detach().double().cpu().reshape(-1)


def _vectors(pred: ArrayLike, target: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = _vector(pred), _vector(target)
    assert pred.shape == target.shape, f"pred {tuple(pred.shape)} vs target {tuple(target.shape)}"
    return pred, target


def pairwise_accuracy(pred: ArrayLike, target: ArrayLike, chunk: int = 2048) -> float:
    """Share of item pairs that `pred` orders as `target` does, in [0, 1]; 0.5 is chance.

    Every pair of items with different targets counts once (target ties are excluded); a pair the
    prediction ties counts as half right. NaN when no pair has different targets. pred, target
    [N]; O(N^2) comparisons, done in row chunks of `chunk` to bound memory.
    """
    pred, target = _vectors(pred, target)
    correct, total = 0.0, 0
    for start in range(0, pred.numel(), chunk):
        # ordered pairs (i, j) over all j: each unordered pair appears twice, symmetrically,
        # so the ratio equals the one over unordered pairs
        dt = torch.sign(target[start : start + chunk, None] - target[None])  # [C, N]
        dp = torch.sign(pred[start : start + chunk, None] - pred[None])
        valid = dt != 0
        correct += ((dp == dt) & valid).sum().item() + 0.5 * ((dp == 0) & valid).sum().item()
        total += int(valid.sum())
    return correct / total if total else math.nan


def spearman(pred: ArrayLike, target: ArrayLike) -> float:
    """Spearman rank correlation in [-1, 1]; NaN for fewer than 2 items or a constant input."""
    pred, target = _vectors(pred, target)
    if pred.numel() < 2 or pred.unique().numel() < 2 or target.unique().numel() < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(pred.numpy(), target.numpy()).statistic)


def adjusted_rand_index(labels_a: ArrayLike, labels_b: ArrayLike) -> float:
    """Agreement of two partitions of the same raters, 1 = identical, ~0 = chance (sklearn)."""
    a, b = np.asarray(labels_a).reshape(-1), np.asarray(labels_b).reshape(-1)
    assert a.shape == b.shape, f"labels {a.shape} vs {b.shape}"
    return float(adjusted_rand_score(a, b))


def per_rater(
    metric: Metric, pred: ArrayLike, target: ArrayLike, rater: ArrayLike
) -> dict[int, float]:
    """`metric` over each rater's rows: pred, target, rater [N] -> {rater index: value}."""
    pred, target = _vectors(pred, target)
    rater = torch.as_tensor(np.asarray(rater)).reshape(-1).long()
    assert rater.shape == pred.shape, f"rater {tuple(rater.shape)} vs pred {tuple(pred.shape)}"
    return {int(r): metric(pred[rater == r], target[rater == r]) for r in rater.unique()}


def group_mean(
    values: Mapping[int, float], group_of: Mapping[int, Hashable] | ArrayLike
) -> dict[Hashable, float]:
    """Mean of per-rater `values` within each group, groups in sorted order, NaNs skipped.

    group_of maps rater -> group: an array [R] of cluster indices, or a mapping to any sortable
    group key (a known group's name)."""
    groups = _groups(values, group_of)
    return {k: float(np.mean(vs)) for k, vs in groups.items()}


def _groups(
    values: Mapping[int, float], group_of: Mapping[int, Hashable] | ArrayLike
) -> dict[Hashable, list[float]]:
    """{group: [finite values of its raters]}, groups sorted, raters in `values` order."""
    if not isinstance(group_of, Mapping):
        array = np.asarray(group_of).reshape(-1)
        group_of = {r: int(array[r]) for r in values}
    groups: dict[Hashable, list[float]] = {}
    for r, v in values.items():
        if not math.isnan(v):
            groups.setdefault(group_of[r], []).append(v)
    return dict(sorted(groups.items()))


def worst(values: Mapping[Hashable, float]) -> tuple[Hashable, float]:
    """The (key, value) with the lowest value, NaNs skipped: the worst-served cluster."""
    finite = {k: v for k, v in values.items() if not math.isnan(v)}
    if not finite:
        return -1, math.nan
    key = min(finite, key=finite.get)
    return key, finite[key]


@dataclass
class RaterReport:
    """A metric per rater, averaged per cluster, and the worst cluster's figure. Raters whose
    metric is NaN (nothing to rank) are left out of every aggregate."""

    per_rater: dict[int, float]
    per_cluster: dict[Hashable, float]
    mean: float  # over raters
    worst_cluster: Hashable
    worst_value: float
    raters_per_cluster: dict[Hashable, int]  # raters counted in each cluster's mean


def by_rater(
    pred: ArrayLike,
    target: ArrayLike,
    rater: ArrayLike,
    rater_cluster: Mapping[int, Hashable] | ArrayLike,
    metric: Metric = pairwise_accuracy,
) -> RaterReport:
    """`metric` per rater (pred for that rater vs its target), per cluster, and worst cluster.

    pred, target, rater [N] (row i: image scored for rater[i]); rater_cluster: [R] cluster
    indices, or a mapping rater -> group (see `group_mean`).
    """
    values = per_rater(metric, pred, target, rater)
    groups = _groups(values, rater_cluster)
    clusters = {k: float(np.mean(vs)) for k, vs in groups.items()}
    finite = [v for v in values.values() if not math.isnan(v)]
    key, value = worst(clusters)
    mean = float(np.mean(finite)) if finite else math.nan
    counts = {k: len(vs) for k, vs in groups.items()}
    return RaterReport(values, clusters, mean, key, value, counts)
