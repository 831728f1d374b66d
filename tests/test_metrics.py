"""Ranking metrics and their per-rater / per-cluster aggregates, on hand-checked numbers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from reward_models.metrics import (
    adjusted_rand_index,
    by_rater,
    group_mean,
    pairwise_accuracy,
    per_rater,
    spearman,
    worst,
)


def test_pairwise_accuracy_on_hand_checked_cases():
    assert pairwise_accuracy([1.0, 2.0, 3.0], [10, 20, 30]) == 1.0
    assert pairwise_accuracy([3.0, 2.0, 1.0], [10, 20, 30]) == 0.0
    # pairs (0,1), (0,2), (1,2): only (0,2) ordered right
    assert pairwise_accuracy([2.0, 1.0, 3.0], [1, 3, 2]) == pytest.approx(1 / 3)


def test_pairwise_accuracy_excludes_target_ties_and_halves_prediction_ties():
    # target tie (0,1) excluded; (0,2) and (1,2) both wrong
    assert pairwise_accuracy([3.0, 2.0, 1.0], [1, 1, 2]) == 0.0
    assert pairwise_accuracy([1.0, 1.0], [1, 2]) == 0.5
    assert math.isnan(pairwise_accuracy([1.0, 2.0, 3.0], [5, 5, 5]))


def test_pairwise_accuracy_matches_brute_force_over_pairs_at_any_chunk_size():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 8, (60,), generator=g).float()  # prediction ties included
    target = torch.randint(0, 5, (60,), generator=g).float()  # and target ties
    right = total = 0.0
    for i, j in itertools.combinations(range(60), 2):
        if target[i] != target[j]:
            total += 1
            if pred[i] == pred[j]:
                right += 0.5
            elif (pred[i] > pred[j]) == (target[i] > target[j]):
                right += 1
    expected = right / total
    assert pairwise_accuracy(pred, target) == pytest.approx(expected)
    assert pairwise_accuracy(pred, target, chunk=7) == pytest.approx(expected)


def test_spearman_on_hand_checked_cases():
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # target ranks (1, 2, 3.5, 5, 3.5) against (1..5): 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert math.isnan(spearman([1, 2, 3], [7, 7, 7]))
    assert math.isnan(spearman([1], [2]))


def test_adjusted_rand_index_ignores_label_names():
    assert adjusted_rand_index([0, 0, 1, 1, 2], [2, 2, 0, 0, 1]) == 1.0
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)


def test_per_rater_cluster_and_worst_cluster_aggregates():
    # rater 0: perfect; rater 1: half right (one of two pairs); rater 2: reversed
    pred = torch.tensor([1.0, 2.0, 1.0, 3.0, 2.0, 3.0, 2.0, 1.0])
    target = torch.tensor([1.0, 2.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    rater = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    values = per_rater(pairwise_accuracy, pred, target, rater)
    assert values == {0: 1.0, 1: pytest.approx(2 / 3), 2: 0.0}
    rater_cluster = torch.tensor([0, 0, 1])  # raters 0 and 1 in cluster 0, rater 2 in cluster 1
    assert group_mean(values, rater_cluster) == {0: pytest.approx(5 / 6), 1: 0.0}
    assert worst({0: 0.8, 1: 0.3, 2: math.nan}) == (1, 0.3)

    report = by_rater(pred, target, rater, rater_cluster)
    assert report.per_cluster == {0: pytest.approx(5 / 6), 1: 0.0}
    assert (report.worst_cluster, report.worst_value) == (1, 0.0)
    assert report.mean == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert report.raters_per_cluster == {0: 2, 1: 1}


def test_groups_may_be_named_by_a_mapping_from_rater_to_group():
    pred = torch.tensor([1.0, 2.0, 1.0, 3.0, 2.0, 3.0, 2.0, 1.0])
    target = torch.tensor([1.0, 2.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    rater = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    report = by_rater(pred, target, rater, {0: "sunny", 1: "sunny", 2: "noir"})
    assert list(report.per_cluster) == ["noir", "sunny"]  # sorted by name
    assert report.per_cluster == {"noir": 0.0, "sunny": pytest.approx(5 / 6)}
    assert (report.worst_cluster, report.worst_value) == ("noir", 0.0)


def test_raters_without_a_ranking_are_skipped_in_aggregates():
    # rater 1 gave every item the same score: no pair to rank, NaN, left out of its cluster mean
    pred = torch.tensor([1.0, 2.0, 1.0, 2.0])
    target = torch.tensor([1.0, 2.0, 5.0, 5.0])
    report = by_rater(pred, target, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0]))
    assert math.isnan(report.per_rater[1])
    assert report.per_cluster == {0: 1.0}
    assert report.mean == 1.0
    assert report.raters_per_cluster == {0: 1}  # the rater with nothing to rank is not counted
