"""`plural_diffusion.new_user`: the rater head seen as the active query sees a latent head, and how
sure the page is of a user's nearest cluster."""

import torch

from plural_diffusion.new_user import RaterQueryHead, cluster_probability
from reward_models.heads import RaterHeadConfig, build_head
from reward_models.research.latent import TastePosterior


def test_the_rater_head_scores_every_image_under_every_drawn_taste():
    torch.manual_seed(0)
    head = build_head(RaterHeadConfig(feature_dim=6, n_raters=4, taste_dim=3)).eval()
    features = torch.nn.functional.normalize(torch.randn(5, 6), dim=-1)  # [M, D]
    tastes = torch.randn(7, 3)  # [S, d]
    grid = RaterQueryHead(head).utility(features[None], tastes[:, None])  # [S, M]
    assert grid.shape == (7, 5)
    for s in range(7):
        one = head.score(features, tastes[s].expand(5, -1))
        assert torch.allclose(grid[s], one, atol=1e-6)


def test_cluster_probability_is_the_share_of_posterior_draws_nearest_each_centroid():
    centroids = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    sure = TastePosterior(torch.tensor([[3.9, 0.1]]), torch.full((1, 2), 0.01))
    assert cluster_probability(sure, centroids).tolist() == [0.0, 1.0, 0.0]
    # halfway between two centroids and unsure: about even between them, the third far behind
    torn = TastePosterior(torch.tensor([[2.0, 0.0]]), torch.full((1, 2), 1.0))
    p = cluster_probability(torn, centroids, n_samples=4000)
    assert abs(p.sum().item() - 1.0) < 1e-6
    assert abs(p[0] - p[1]) < 0.1 and p[2] < 0.1
