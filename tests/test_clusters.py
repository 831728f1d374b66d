"""Taste clusters over raters' taste vectors: choosing K, naming, scoring, saving.

(That clusters of a *trained* RaterHead's tastes recover conflicting rater groups is specified
in test_heads.py, on the synthetic world.)
"""

from __future__ import annotations

import pytest
import torch

from reward_models.clusters import ClusterConfig, TasteClusters, fit_clusters
from reward_models.errors import UserError
from reward_models.heads import MeanHeadConfig, RaterHeadConfig, build_head
from reward_models.metrics import adjusted_rand_index

CENTRES = torch.tensor([[2.0, 0.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
SIZES = (30, 20, 10)


def blobs(seed: int = 0, spread: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """60 raters' taste vectors [60, 4] in three blobs of 30/20/10, and their true groups [60]."""
    g = torch.Generator().manual_seed(seed)
    group = torch.repeat_interleave(torch.arange(3), torch.tensor(SIZES))
    tastes = CENTRES[group] + spread * torch.randn(len(group), 4, generator=g)
    return tastes, group


def test_bic_chooses_three_clusters_for_three_blobs_largest_first():
    tastes, group = blobs()
    clusters = fit_clusters(tastes, ClusterConfig(n_clusters=None, max_clusters=6))
    assert len(clusters) == 3
    assert min(clusters.bic, key=clusters.bic.get) == 3
    assert sorted(clusters.bic) == [1, 2, 3, 4, 5, 6]
    assert adjusted_rand_index(clusters.labels, group) == 1.0
    assert clusters.shares.tolist() == pytest.approx([0.5, 1 / 3, 1 / 6])
    # cluster 0 is the largest blob; centroids sit on the blob centres
    assert torch.allclose(clusters.centroids, CENTRES, atol=0.1)
    assert clusters.names == ["cluster_0", "cluster_1", "cluster_2"]


def test_bic_chooses_one_cluster_for_one_blob():
    tastes = 0.2 * torch.randn(40, 4, generator=torch.Generator().manual_seed(3))
    clusters = fit_clusters(tastes, ClusterConfig(n_clusters=None))
    assert len(clusters) == 1
    assert clusters.shares.tolist() == [1.0]


def test_kmeans_with_a_given_k_finds_the_same_groups():
    tastes, group = blobs(seed=1)
    clusters = fit_clusters(tastes, ClusterConfig(n_clusters=3, method="kmeans"))
    assert adjusted_rand_index(clusters.labels, group) == 1.0
    assert clusters.bic == {}  # K was given, not chosen
    assert torch.allclose(clusters.centroids, CENTRES, atol=0.1)


def test_naming_callback_names_clusters_and_names_select_them():
    tastes, _ = blobs()

    def name(k: int, centroid: torch.Tensor, members: torch.Tensor) -> str:
        return f"{'xy'[int(centroid[:2].abs().argmax())]}{'+' if centroid.sum() > 0 else '-'}{len(members)}"

    clusters = fit_clusters(tastes, ClusterConfig(n_clusters=3), name_fn=name)
    assert clusters.names == ["x+30", "x-20", "y+10"]
    assert torch.equal(clusters.taste("y+10"), clusters.centroids[2])
    with pytest.raises(UserError, match="unknown cluster 'z'"):
        clusters.taste("z")
    with pytest.raises(UserError, match="duplicate names"):
        fit_clusters(tastes, ClusterConfig(n_clusters=3), name_fn=lambda k, c, m: "same")


def test_more_clusters_than_raters_is_a_user_error():
    tastes, _ = blobs()
    with pytest.raises(UserError, match="cannot make 61 taste clusters from 60 raters"):
        fit_clusters(tastes, ClusterConfig(n_clusters=61))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("method", ["gmm", "kmeans"])
def test_an_empty_cluster_is_a_user_error(method):
    # ten raters with only two distinct tastes cannot fill three clusters
    tastes = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    with pytest.raises(UserError, match="got no raters; ask for fewer clusters"):
        fit_clusters(tastes, ClusterConfig(n_clusters=3, method=method))


def test_save_load_round_trip(tmp_path):
    tastes, _ = blobs()
    clusters = fit_clusters(tastes, ClusterConfig(n_clusters=None, max_clusters=4))
    clusters.save(tmp_path / "clusters")
    loaded = TasteClusters.load(tmp_path / "clusters")
    assert torch.equal(loaded.centroids, clusters.centroids)
    assert torch.equal(loaded.labels, clusters.labels)
    assert torch.equal(loaded.shares, clusters.shares)
    assert loaded.names == clusters.names
    assert loaded.bic == clusters.bic
    with pytest.raises(UserError, match="file not found"):
        TasteClusters.load(tmp_path / "absent")


def test_cluster_score_is_the_head_score_at_the_centroid_taste():
    torch.manual_seed(0)
    head = build_head(RaterHeadConfig(feature_dim=8, n_raters=60, taste_dim=4, hidden_dims=(16,)))
    with torch.no_grad():
        head.film.weight.normal_()  # make the taste matter (FiLM starts as the identity)
    head.eval()
    tastes, _ = blobs()
    clusters = fit_clusters(tastes, ClusterConfig(n_clusters=3))
    x = torch.randn(5, 8)
    with torch.no_grad():
        all_scores = clusters.score_all(head, x)  # [5, 3]
        for k in range(3):
            expected = head.score(x, clusters.centroids[k].expand(5, -1))
            assert torch.equal(clusters.score(head, x, cluster=k), expected)
            assert torch.equal(all_scores[:, k], expected)
        assert torch.equal(clusters.score(head, x, cluster="cluster_1"), all_scores[:, 1])
        assert not torch.allclose(all_scores[:, 0], all_scores[:, 1])
    with pytest.raises(UserError, match="out of range: there are 3 clusters"):
        clusters.score(head, x, cluster=3)
    mean_head = build_head(MeanHeadConfig(feature_dim=8, hidden_dims=(4,)))
    with pytest.raises(UserError, match="4-dim tastes but the mean head takes 0-dim"):
        clusters.score(mean_head, x, cluster=0)
