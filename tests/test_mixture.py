"""Specification of the mixture-density head (reward_models.research.mdn) and EM over raters (mixture).

The world: 16-dim unit features, 24 raters in two groups of opposite taste (utility +3 w.x or
-3 w.x), each scoring 30 of 150 images with a personal offset (sd 2 score points) and noise sd
0.3, and making 30 pairwise choices. Group membership is never given to the models.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from reward_models.errors import UserError
from reward_models.heads import build_head, load_head, save_head
from reward_models.metrics import adjusted_rand_index, spearman
from reward_models.research.mdn import (
    MDNHead,
    MDNHeadConfig,
    MDNTrainConfig,
    fit_mdn,
    rater_log_likelihood,
)
from reward_models.research.mixture import EMConfig, HeadMixture, fit_em
from reward_models.train import PairSet, ScoreSet

torch.set_num_threads(1)

DIM, N_ITEMS, N_RATERS, PER_RATER = 16, 150, 24, 30


def two_tastes(seed: int = 0):
    """features [N, D]; utility [N, R]; group [R]; ScoreSet; PairSet."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(N_ITEMS, DIM, generator=g), dim=-1)
    w = 3.0 * F.normalize(torch.randn(DIM, generator=g), dim=0)
    group = torch.randperm(N_RATERS, generator=g) % 2  # shuffled, so index order tells nothing
    utility = (x @ w)[:, None] * (1.0 - 2.0 * group.float())[None]
    offset = 2.0 * torch.randn(N_RATERS, generator=g)
    item = torch.cat([torch.randperm(N_ITEMS, generator=g)[:PER_RATER] for _ in range(N_RATERS)])
    rater = torch.arange(N_RATERS).repeat_interleave(PER_RATER)
    score = 5.0 + offset[rater] + utility[item, rater] + 0.3 * torch.randn(len(item), generator=g)
    a = torch.randint(N_ITEMS, (len(rater),), generator=g)
    b = torch.randint(N_ITEMS, (len(rater),), generator=g)
    p_b = torch.sigmoid(3.0 * (utility[b, rater] - utility[a, rater]))
    winner = (torch.rand(len(rater), generator=g) < p_b).float()
    return x, utility, group, ScoreSet(x, rater, score, item), PairSet(x, a, b, rater, winner)


@pytest.fixture(scope="module")
def world():
    return two_tastes()


FAST_EM = EMConfig(n_components=2, iterations=12, m_step_steps=25, max_components=3)


# ---- MDN head -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mdn(world):
    _, _, _, scores, _ = world
    torch.manual_seed(0)
    head = build_head(MDNHeadConfig(feature_dim=DIM, n_components=2, hidden_dims=(32,)))
    losses = fit_mdn(head, scores, MDNTrainConfig(epochs=80))
    return head, losses


def test_mdn_components_separate_two_conflicting_groups(world, mdn):
    x, utility, group, scores, _ = world
    head, losses = mdn
    ll, raters = rater_log_likelihood(head, scores)
    component = ll.argmax(-1)
    ari = adjusted_rand_index(component, group[raters])
    print(f"MDN rater->component ARI {ari:.3f}; NLL per rating {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert ari >= 0.9
    # component k's mean, read with a one-hot taste, ranks images as its group's utility does
    for k in range(2):
        members = raters[component == k]
        gold = utility[:, members[0]]
        mean_k = head.score(x, F.one_hot(torch.full((N_ITEMS,), k), 2).float())
        rho = spearman(mean_k, gold)
        print(f"component {k}: {len(members)} raters, Spearman with their utility {rho:.3f}")
        assert rho > 0.9


def test_mdn_score_reads_a_component_or_the_mixture_mean(mdn, world):
    head, _ = mdn
    x = world[0][:5]
    mean, sd, log_w = head.components(x)
    assert mean.shape == sd.shape == log_w.shape == (5, 2) and (sd >= head.config.min_sd).all()
    assert torch.allclose(log_w.exp().sum(-1), torch.ones(5))
    one_hot_1 = torch.tensor([[0.0, 1.0]]).expand(5, -1)
    assert torch.allclose(head.score(x, one_hot_1), mean[:, 1])
    assert torch.allclose(head.score(x), (log_w.exp() * mean).sum(-1))
    assert head.taste_dim == 2
    with pytest.raises(UserError, match="one-hot"):
        head.score(x, torch.zeros(5, 3))


def test_mdn_saves_and_loads_through_the_head_factory(mdn, world, tmp_path):
    head, _ = mdn
    save_head(head, tmp_path / "mdn")
    loaded = load_head(tmp_path / "mdn", feature_dim=DIM)
    assert isinstance(loaded, MDNHead)
    x = world[0][:9]
    for a, b in zip(loaded.components(x), head.components(x)):
        assert torch.equal(a, b)


# ---- EM mixture of heads --------------------------------------------------------------------------
def test_em_recovers_the_groups_from_a_random_start(world):
    x, utility, group, scores, pairs = world
    mixture = fit_em(scores, pairs, dataclasses.replace(FAST_EM, init="random"))
    ari = adjusted_rand_index(mixture.labels, group)
    print(
        f"EM ARI {ari:.3f} after {len(mixture.log_likelihood)} iterations, "
        f"log-lik per rating {[round(v, 3) for v in mixture.log_likelihood]}"
    )
    assert ari >= 0.9
    assert mixture.log_likelihood[-1] > mixture.log_likelihood[0]
    assert torch.allclose(mixture.weights, torch.tensor([0.5, 0.5]), atol=0.05)
    # each group's head ranks images as its raters' utility does
    for k in range(2):
        rater = int((mixture.labels == k).nonzero()[0])
        assert spearman(mixture.score(x, k), utility[:, rater]) > 0.9


def test_em_chooses_two_groups_by_held_out_likelihood(world):
    _, _, group, scores, _ = world
    mixture = fit_em(scores, None, dataclasses.replace(FAST_EM, n_components=None))
    print("held-out log-likelihood per rating by K:", mixture.held_out)
    assert len(mixture.heads) == 2
    assert mixture.held_out[2] > mixture.held_out[1] + 0.3  # one group cannot fit both tastes
    assert adjusted_rand_index(mixture.labels, group) >= 0.9


def test_em_groups_raters_from_pairwise_choices_alone(world):
    _, _, group, _, pairs = world
    mixture = fit_em(None, pairs, FAST_EM)
    assert adjusted_rand_index(mixture.labels, group) >= 0.9


def test_em_mixture_saves_and_loads(world, tmp_path):
    x, _, _, scores, _ = world
    mixture = fit_em(scores, None, dataclasses.replace(FAST_EM, iterations=5))
    mixture.save(tmp_path / "em")
    loaded = HeadMixture.load(tmp_path / "em")
    assert torch.equal(loaded.labels, mixture.labels)
    assert torch.allclose(loaded.weights, mixture.weights)
    for k in range(2):
        assert torch.equal(loaded.score(x, k), mixture.score(x, k))
    with pytest.raises(UserError, match="out of range"):
        loaded.score(x, 2)
