"""The egalitarian lottery: shares that raise the worst-off cluster's place in its range, and a
taste-blind policy's images drawn from a matched policy's by them."""

import pytest
import torch

from plural_diffusion.lottery import egalitarian_shares, lottery_counts, lottery_images
from reward_models.errors import UserError


def test_clusters_served_only_by_their_own_images_get_equal_shares():
    shares = egalitarian_shares(torch.eye(3), torch.zeros(3))
    torch.testing.assert_close(shares, torch.full((3,), 1 / 3), atol=1e-6, rtol=0)


def test_a_cluster_also_served_by_anothers_images_needs_no_share_of_its_own():
    # images made for sunny (row 1) please vivid (column 2) as much as vivid's own do
    cross = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    shares = egalitarian_shares(cross, torch.zeros(3))
    torch.testing.assert_close(shares, torch.tensor([0.5, 0.5, 0.0]), atol=1e-6, rtol=0)


def test_the_shares_do_not_depend_on_each_heads_scale_or_offset():
    g = torch.Generator().manual_seed(0)
    cross = torch.rand(3, 3, generator=g) + 2 * torch.eye(3)
    base = torch.rand(3, generator=g) * 0.5
    shares = egalitarian_shares(cross, base)
    scale, shift = torch.tensor([10.0, 0.1, 3.0]), torch.tensor([5.0, -2.0, 0.0])
    rescaled = egalitarian_shares(cross * scale + shift, base * scale + shift)
    torch.testing.assert_close(rescaled, shares, atol=1e-5, rtol=0)
    assert shares.sum().item() == pytest.approx(1.0) and (shares >= 0).all()
    # and no other point of the simplex lifts the worst-off cluster's place in its range further
    lo = torch.minimum(base, cross.min(dim=0).values)
    hi = torch.maximum(base, cross.max(dim=0).values)
    best = ((shares @ cross - lo) / (hi - lo)).min()
    for _ in range(200):
        p = torch.distributions.Dirichlet(torch.ones(3)).sample()
        assert ((p @ cross - lo) / (hi - lo)).min() <= best + 1e-5


def test_a_cluster_the_base_already_serves_best_does_not_take_every_image():
    # the base makes noir's ideal (noir 1.0 on its images, 0.9 on noir's own): noir cannot gain
    cross = torch.tensor([[0.9, 0.0, 0.0], [0.1, 1.0, 0.2], [0.1, 0.2, 1.0]])
    shares = egalitarian_shares(cross, torch.tensor([1.0, 0.0, 0.0]))
    assert shares.max() < 0.6 and (shares > 0.2).all(), shares


def test_one_cluster_or_nan_utilities_are_one_line_errors():
    with pytest.raises(UserError, match="at least 2 taste clusters"):
        egalitarian_shares(torch.ones(1, 1), torch.zeros(1))
    bad = torch.eye(3)
    bad[0, 1] = float("nan")
    with pytest.raises(UserError, match="not finite"):
        egalitarian_shares(bad, torch.zeros(3))
    with pytest.raises(UserError, match="differ"):
        egalitarian_shares(torch.eye(3), torch.zeros(2))


def test_counts_are_whole_numbers_that_keep_the_shares():
    assert lottery_counts(8, torch.tensor([0.29, 0.35, 0.36])) == [2, 3, 3]
    assert lottery_counts(16, torch.tensor([0.5, 0.5, 0.0])) == [8, 8, 0]
    assert sum(lottery_counts(7, torch.tensor([0.2, 0.3, 0.5]))) == 7


def test_each_lottery_image_is_the_matched_image_of_its_prompt_seed_and_drawn_cluster():
    names = ["noir", "sunny", "vivid"]
    n_prompts, n_seeds = 2, 8
    # image value = cluster * 100 + row, so a picked image tells where it came from
    per_taste = {
        n: (k * 100 + torch.arange(n_prompts * n_seeds))
        .float()
        .view(-1, 1, 1, 1)
        .expand(-1, 3, 2, 2)
        for k, n in enumerate(names)
    }
    shares = torch.tensor([0.25, 0.5, 0.25])
    images, made_for = lottery_images(per_taste, shares, names, n_prompts, seed=3)
    assert images.shape == (16, 3, 2, 2)
    for row, name in enumerate(made_for):
        assert images[row, 0, 0, 0].item() == names.index(name) * 100 + row
    for prompt in range(n_prompts):  # stratified: each prompt holds the shares exactly
        drawn = made_for[prompt * n_seeds : (prompt + 1) * n_seeds]
        assert [drawn.count(n) for n in names] == [2, 4, 2]
    again, made_again = lottery_images(per_taste, shares, names, n_prompts, seed=3)
    assert made_again == made_for and torch.equal(again, images)
    with pytest.raises(UserError, match="missing"):
        lottery_images({"noir": per_taste["noir"]}, shares, names, n_prompts)
