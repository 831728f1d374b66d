"""Specification of the latent taste head (reward_models.research.latent, latent_fit, latent_query).

The world: 16-dim unit features, two groups of raters with opposite tastes (utility +4 w.x or
-4 w.x), each rater scoring 40 of 200 images with a personal offset (sd 2 score points, i.e.
harsh and generous raters) and noise sd 0.3. The population mean utility is 0 everywhere, so a
head that ignores who is rating is at chance; everything above 0.5 comes from the inferred z.
One head is trained once per module on 40 raters; 8 other raters are never seen.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from reward_models.data import RatingData, ScoreTable
from reward_models.errors import UserError
from reward_models.heads import build_head, load_head, save_head
from reward_models.metrics import pairwise_accuracy, spearman
from reward_models.research.latent import Context, LatentHead, LatentHeadConfig
from reward_models.research.latent_eval import diagnose, few_shot_eval, few_shot_protocol
from reward_models.research.latent_fit import LatentTrainConfig, fit_latent
from reward_models.research.latent_query import select_queries
from reward_models.train import PairSet, ScoreSet, TrainHeadConfig, fit_head

torch.set_num_threads(1)

DIM, N_ITEMS, N_RATERS, N_TRAIN, PER_RATER = 16, 200, 48, 40, 40


def conflicting_world(seed: int = 0):
    """features [N, D]; utility [N, R] (+-4 w.x); group [R]; ScoreSet and PairSet of all raters."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(N_ITEMS, DIM, generator=g), dim=-1)
    w = 4.0 * F.normalize(torch.randn(DIM, generator=g), dim=0)
    group = torch.arange(N_RATERS) % 2
    utility = (x @ w)[:, None] * (1.0 - 2.0 * group.float())[None]
    offset = 2.0 * torch.randn(N_RATERS, generator=g)
    items, raters, scores = [], [], []
    a, b, pair_raters = [], [], []
    for r in range(N_RATERS):
        seen = torch.randperm(N_ITEMS, generator=g)[:PER_RATER]
        noise = 0.3 * torch.randn(PER_RATER, generator=g)
        items.append(seen)
        raters.append(torch.full((PER_RATER,), r))
        scores.append(5.0 + offset[r] + utility[seen, r] + noise)
        a.append(seen[:20])
        b.append(seen[20:])
        pair_raters.append(torch.full((20,), r))
    item, rater, score = torch.cat(items), torch.cat(raters), torch.cat(scores)
    a, b, pair_rater = torch.cat(a), torch.cat(b), torch.cat(pair_raters)
    b_wins = (utility[b, pair_rater] > utility[a, pair_rater]).float()
    return x, utility, group, ScoreSet(x, rater, score, item), PairSet(x, a, b, pair_rater, b_wins)


def subset(data: ScoreSet, keep: torch.Tensor) -> ScoreSet:
    return ScoreSet(data.features, data.rater[keep], data.score[keep], data.item[keep])


@pytest.fixture(scope="module")
def world():
    x, utility, group, scores, pairs = conflicting_world()
    train_scores = subset(scores, scores.rater < N_TRAIN)
    test_scores = subset(scores, scores.rater >= N_TRAIN)
    keep = pairs.rater < N_TRAIN
    train_pairs = PairSet(
        x, *(t[keep] for t in (pairs.idx_a, pairs.idx_b, pairs.rater, pairs.winner))
    )
    head = build_head(
        LatentHeadConfig(feature_dim=DIM, taste_dim=2, hidden_dims=(32,), encoder_dim=32)
    )
    cfg = LatentTrainConfig(
        steps=500, users_per_batch=16, max_context=30, kl_anneal_steps=200, lr=3e-3, eval_every=50
    )
    history = fit_latent(head, train_scores, train_pairs, cfg)
    return {
        "x": x,
        "utility": utility,
        "group": group,
        "head": head,
        "history": history,
        "test_scores": test_scores,
        "scores": scores,
        "pairs": pairs,
    }


def user_context(world, rater: int, k: int, seed: int = 0) -> Context:
    s = world["scores"]
    rows = (s.rater == rater).nonzero()[:, 0]
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:k]]
    return Context(features=world["x"][s.item[rows]], scores=s.score[rows])


def test_posterior_variance_shrinks_as_context_grows(world):
    head = world["head"]
    variance = {k: [] for k in (2, 5, 10, 30)}
    for rater in range(N_TRAIN, N_RATERS):
        for k in variance:
            # nested contexts: the first k of one shuffled list of the rater's ratings
            variance[k].append(head.infer(user_context(world, rater, k)).var.min().item())
    mean = {k: sum(v) / len(v) for k, v in variance.items()}
    print("posterior variance of the best-known taste dim by context size:", mean)
    assert mean[2] > mean[5] > mean[10] > mean[30]
    assert mean[30] < 0.3 * mean[2]
    # an empty context is the prior
    prior = head.infer(Context())
    assert torch.allclose(prior.var, torch.ones(1, 2))
    assert torch.allclose(prior.mean, torch.zeros(1, 2))


def test_conditioned_beats_unconditioned_on_held_out_targets(world):
    diag = diagnose(world["head"], world["test_scores"], context_size=10)
    print(diag)
    assert diag.n_users == N_RATERS - N_TRAIN
    # the prior (z = 0) cannot know which of two opposite tastes it serves: chance
    assert 0.4 < diag.unconditioned_accuracy < 0.6
    assert diag.conditioned_accuracy > 0.85
    assert diag.gap > 0.3
    assert diag.active_units >= 1  # not collapsed


def test_new_user_utility_matches_their_gold_utility_from_five_ratings(world):
    head, x = world["head"], world["x"]
    accuracy = []
    for rater in range(N_TRAIN, N_RATERS):
        z = head.infer(user_context(world, rater, 5)).mean.expand(N_ITEMS, -1)
        accuracy.append(pairwise_accuracy(head.score(x, z), world["utility"][:, rater]))
    print("gold pairwise accuracy from 5 ratings per held-out user:", accuracy)
    assert min(accuracy) > 0.8


def test_harsh_or_generous_scale_does_not_change_the_posterior(world):
    head = world["head"]
    ctx = user_context(world, N_TRAIN, 10)
    harsher = Context(features=ctx.features, scores=ctx.scores - 3.0)
    a, b = head.infer(ctx), head.infer(harsher)
    assert torch.allclose(a.mean, b.mean, atol=1e-5) and torch.allclose(a.var, b.var, atol=1e-5)


def test_pairwise_choices_alone_identify_the_taste(world):
    head, x, pairs = world["head"], world["x"], world["pairs"]
    accuracy = []
    for rater in range(N_TRAIN, N_RATERS):
        rows = (pairs.rater == rater).nonzero()[:, 0][:10]
        ctx = Context(
            features_a=x[pairs.idx_a[rows]],
            features_b=x[pairs.idx_b[rows]],
            winner=pairs.winner[rows],
        )
        z = head.infer(ctx).mean.expand(N_ITEMS, -1)
        accuracy.append(pairwise_accuracy(head.score(x, z), world["utility"][:, rater]))
    print("gold pairwise accuracy from 10 choices:", accuracy)
    assert sum(accuracy) / len(accuracy) > 0.85


def test_refinement_keeps_the_posterior_on_the_evidence(world):
    head, x = world["head"], world["x"]
    for rater in (N_TRAIN, N_TRAIN + 1):
        ctx = user_context(world, rater, 10)
        amortised, refined = head.infer(ctx), head.infer(ctx, refine_steps=50)
        for post in (amortised, refined):
            z = post.mean.expand(N_ITEMS, -1)
            assert pairwise_accuracy(head.score(x, z), world["utility"][:, rater]) > 0.85
        assert torch.equal(head.infer(ctx, refine_steps=50).mean, refined.mean)  # deterministic


def test_active_queries_beat_random_queries_on_average(world):
    """A pool where most images barely separate the two tastes (|utility| < noise sd 0.5), a few do.

    Every held-out user starts with 2 ratings of uninformative images and is asked 2 more,
    chosen by BALD on a refined posterior or at random; accuracy is against gold utility.
    """
    head, x, utility = world["head"], world["x"], world["utility"]
    order = utility[:, 0].abs().argsort()
    dull, telling = order[:30], order[-10:]  # |u| < 0.17 vs the 10 largest (|u| > 2.1)
    pool = torch.cat([dull, telling])
    g = torch.Generator().manual_seed(0)

    def rate(idx, rater):
        return utility[idx, rater] + 0.5 * torch.randn(len(idx), generator=g)

    result = {"active": [], "random": []}
    for rater in range(N_TRAIN, N_RATERS):
        for seed in range(4):
            g_seed = torch.Generator().manual_seed(seed)
            shuffled = pool[torch.randperm(len(pool), generator=g_seed)]
            start = dull[torch.randperm(len(dull), generator=g_seed)[:2]]
            for strategy in result:
                asked = start.tolist()
                for _ in range(2):
                    idx = torch.tensor(asked)
                    post = head.infer(Context(x[idx], rate(idx, rater)), refine_steps=30)
                    left = torch.tensor([i for i in shuffled.tolist() if i not in asked])
                    if strategy == "active":
                        pick = select_queries(head, post, x[left], reference=x[idx], seed=seed)
                        asked.append(int(left[pick[0]]))
                    else:
                        asked.append(int(left[0]))
                idx = torch.tensor(asked)
                z = head.infer(Context(x[idx], rate(idx, rater)), refine_steps=30).mean
                pred = head.score(x, z.expand(N_ITEMS, -1))
                result[strategy].append(pairwise_accuracy(pred, utility[:, rater]))
    mean = {k: sum(v) / len(v) for k, v in result.items()}
    print("gold pairwise accuracy after 4 ratings:", mean)
    assert mean["active"] > 0.9
    assert mean["active"] > mean["random"] + 0.1


def test_pair_queries_pick_pairs_whose_outcome_depends_on_taste(world):
    """Between two opposite tastes, the informative pairs are those far apart along w."""
    head, x, utility = world["head"], world["x"], world["utility"]
    prior = head.infer(Context())
    candidates = x[:60]
    chosen = select_queries(head, prior, candidates, n=20, kind="pair")
    gap = (utility[:60, 0][:, None] - utility[:60, 0][None]).abs()  # [60, 60] |u_a - u_b|
    i, j = torch.triu_indices(60, 60, offset=1)
    print(
        "mean |u_a - u_b|: chosen",
        gap[chosen[:, 0], chosen[:, 1]].mean().item(),
        "all pairs",
        gap[i, j].mean().item(),
    )
    assert gap[chosen[:, 0], chosen[:, 1]].mean() > 2.0 * gap[i, j].mean()


def test_bounded_score_is_a_win_rate_in_unit_interval(world):
    head = build_head(world["head"].config)
    head.load_state_dict(world["head"].state_dict())
    x = world["x"]
    z = head.infer(user_context(world, N_TRAIN, 10)).mean.expand(N_ITEMS, -1)
    raw = head.score(x, z)
    head.set_reference(x[:50])
    bounded = head.score(x, z)
    assert head.config.reference_size == 50
    assert bounded.min() >= 0.0 and bounded.max() <= 1.0
    assert bounded.max() > 0.9 and bounded.min() < 0.1  # the scale is used, not squashed
    assert spearman(bounded, raw) > 0.999  # a monotone transform of the utility


def test_save_and_load_round_trip_through_the_head_factory(world, tmp_path):
    head = build_head(world["head"].config)
    head.load_state_dict(world["head"].state_dict())
    head.set_reference(world["x"][:10])
    save_head(head, tmp_path / "latent", metadata={"clip": "synthetic"})
    loaded = load_head(tmp_path / "latent", feature_dim=DIM)
    assert isinstance(loaded, LatentHead) and loaded.config.reference_size == 10
    ctx = user_context(world, N_TRAIN, 10)
    z = head.infer(ctx).mean
    assert torch.equal(loaded.infer(ctx).mean, z)
    x = world["x"][:7]
    assert torch.equal(loaded.score(x, z.expand(7, -1)), head.score(x, z.expand(7, -1)))
    assert torch.equal(loaded.score_scale, head.score_scale)


def score_table(world, raters) -> ScoreTable:
    """The synthetic scores of `raters` as a ScoreTable, images named img_<row>.png."""
    s = world["scores"]
    keep = torch.isin(s.rater, torch.as_tensor(raters))
    df = pd.DataFrame(
        {
            "image": [f"img_{i}.png" for i in s.item[keep].tolist()],
            "rater_id": [f"r{r:02d}" for r in s.rater[keep].tolist()],
            "score": s.score[keep].tolist(),
        }
    )
    return ScoreTable(df.assign(source="synthetic.csv", source_row=range(len(df))), image_root=".")


def features_of(world):
    x = world["x"]
    return lambda names: x[torch.tensor([int(n[4:-4]) for n in names])]


def test_few_shot_eval_averages_over_test_raters(world):
    table = score_table(world, list(range(N_TRAIN, N_RATERS)))
    result = few_shot_eval(world["head"], table, features_of(world), k=10)
    print(result.pairwise_accuracy, result.spearman, result.prior_pairwise_accuracy)
    assert result.n_raters == N_RATERS - N_TRAIN and result.k == 10
    assert len(result.per_rater) == N_RATERS - N_TRAIN
    assert result.pairwise_accuracy > 0.85 and result.spearman > 0.85
    assert abs(result.prior_pairwise_accuracy - 0.5) < 0.1
    with pytest.raises(UserError, match=r"k \+ 2"):
        few_shot_eval(world["head"], table, features_of(world), k=PER_RATER)


def test_few_shot_protocol_trains_on_some_raters_and_adapts_to_the_others(world):
    data = RatingData(scores=score_table(world, list(range(N_RATERS))))
    small = LatentHeadConfig(taste_dim=2, hidden_dims=(32,), encoder_dim=32)
    fast = LatentTrainConfig(
        steps=300, users_per_batch=16, max_context=30, kl_anneal_steps=150, lr=3e-3, eval_every=50
    )
    results = few_shot_protocol(data, features_of(world), small, fast, ks=(5,), test_raters=0.25)
    result = results[5]
    print(result.pairwise_accuracy, result.prior_pairwise_accuracy)
    assert result.n_raters == 12  # a quarter of the 48 raters, never trained on
    assert result.pairwise_accuracy > result.prior_pairwise_accuracy + 0.2


def test_mistakes_are_user_errors(world):
    head = world["head"]
    with pytest.raises(UserError, match="expected \\[3, 16\\]"):
        head.infer(Context(features=torch.zeros(3, 15), scores=torch.zeros(3)))
    with pytest.raises(UserError, match="NaN"):
        head.infer(Context(features=torch.zeros(2, DIM), scores=torch.tensor([1.0, float("nan")])))
    with pytest.raises(UserError, match="fit_latent"):
        fit_head(head, world["test_scores"], cfg=TrainHeadConfig(epochs=1, progress=False))
    with pytest.raises(UserError, match="taste vectors z"):
        head.score(world["x"][:4], torch.zeros(4, 3))
    with pytest.raises(UserError, match="reference set"):
        head.set_reference(torch.zeros(5, 3))
