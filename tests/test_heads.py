"""Reward heads, specified on a synthetic world whose tastes conflict.

The world: N items with L2-normalised features in D=16 dims; a majority of raters (70%) whose
utility is +w.x and a minority (30%) whose utility is -w.x. Every rater reports on their own scale
(offset in [2, 6], scale in [0.5, 1.5]) with noise, and sees a random 30% of the items. A head
that averages raters must fail the minority; a rater-aware head must serve both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from reward_models.clusters import ClusterConfig, fit_clusters
from reward_models.errors import UserError
from reward_models.heads import (
    HEAD_KINDS,
    MeanHead,
    MeanHeadConfig,
    RaterHeadConfig,
    RewardHead,
    build_head,
    load_head,
    read_head_metadata,
    save_head,
)
from reward_models.metrics import adjusted_rand_index, by_rater, pairwise_accuracy
from reward_models.train import PairSet, ScoreSet, TrainHeadConfig, fit_head

DIM = 16
N_RATERS = 40
TRAIN = TrainHeadConfig(epochs=150, batch_size=256, lr=3e-3, patience=15, progress=False)


@dataclass
class World:
    features: torch.Tensor  # [N, D] training items
    utility: torch.Tensor  # [N] the majority's gold utility w.x of each training item
    scores: ScoreSet  # ratings of the training items
    group: torch.Tensor  # [R] 0 = majority (+w.x), 1 = minority (-w.x)
    offset: torch.Tensor  # [R] true rating offsets
    scale: torch.Tensor  # [R] true rating scales
    test_features: torch.Tensor  # [M, D] items no rater saw
    test_utility: torch.Tensor  # [M, R] gold utility of each test item for each rater


def unit_rows(n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, DIM, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def make_world(seed: int = 0, n_items: int = 400, noise: float = 0.3) -> World:
    g = torch.Generator().manual_seed(seed)
    features, test_features = unit_rows(n_items, g), unit_rows(300, g)
    w = torch.randn(DIM, generator=g)
    w = w / w.norm() * DIM**0.5  # utilities of unit-norm items have sd ~1
    group = (torch.arange(N_RATERS) >= round(0.7 * N_RATERS)).long()
    sign = 1.0 - 2.0 * group.float()  # [R]
    offset = 2 + 4 * torch.rand(N_RATERS, generator=g)
    scale = 0.5 + torch.rand(N_RATERS, generator=g)
    seen = torch.rand(n_items, N_RATERS, generator=g) < 0.3
    item, rater = seen.nonzero(as_tuple=True)
    utility = (features @ w)[item] * sign[rater]  # [n_ratings]
    score = offset[rater] + scale[rater] * utility + noise * torch.randn(item.numel(), generator=g)
    test_utility = (test_features @ w)[:, None] * sign[None]
    return World(
        features,
        features @ w,
        ScoreSet(features, rater, score, item),
        group,
        offset,
        scale,
        test_features,
        test_utility,
    )


def rater_report(head, world: World, tastes: torch.Tensor | None = None):
    """Each rater's pairwise accuracy on the unseen test items, grouped by true group."""
    x, gold = world.test_features, world.test_utility
    with torch.no_grad():
        if tastes is None:  # a taste-blind head: one ranking for everyone
            pred = head.score(x)[:, None].expand(-1, N_RATERS)
        else:
            pred = torch.stack([head.score(x, z.expand(len(x), -1)) for z in tastes], dim=1)
    rater = torch.arange(N_RATERS).expand(len(x), -1)
    return by_rater(pred.flatten(), gold.flatten(), rater.flatten(), world.group)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # these models are tiny: on a shared 2-core machine, a second intra-op thread only adds
    # contention
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


@pytest.fixture(scope="module")
def mean_head(world):
    head = build_head(MeanHeadConfig(feature_dim=DIM, hidden_dims=(64, 32)))
    fit_head(head, scores=world.scores, cfg=TRAIN)
    return head


@pytest.fixture(scope="module")
def rater_head(world):
    head = build_head(
        RaterHeadConfig(feature_dim=DIM, n_raters=N_RATERS, taste_dim=4, hidden_dims=(64, 32))
    )
    history = fit_head(head, scores=world.scores, cfg=TRAIN)
    assert history.val_loss[history.best_epoch] == min(history.val_loss)
    return head


def test_mean_head_serves_the_majority_and_ranks_the_minority_below_chance(world, mean_head):
    report = rater_report(mean_head, world)
    assert report.per_cluster[0] > 0.9
    assert report.per_cluster[1] < 0.5  # measured 0.06: it ranks the minority's images backwards
    assert report.worst_cluster == 1


def test_rater_head_ranks_well_for_both_conflicting_groups(world, rater_head):
    report = rater_report(rater_head, world, rater_head.rater_tastes())
    assert report.per_cluster[0] > 0.9
    assert report.per_cluster[1] > 0.9  # measured 0.98 for both groups
    assert report.worst_value > 0.9


def test_rater_calibration_predicts_each_raters_own_scale(world, rater_head):
    # noiseless ratings of unseen items: offset_r + scale_r * utility
    x = world.test_features
    rater = torch.arange(N_RATERS).repeat_interleave(len(x))
    truth = world.offset[rater] + world.scale[rater] * world.test_utility.T.flatten()
    with torch.no_grad():
        pred = rater_head.predict_rating(x.repeat(N_RATERS, 1), rater)
    r2 = 1 - ((pred - truth) ** 2).mean() / truth.var()
    assert r2 > 0.9  # measured 0.97


def test_a_harsh_and_a_generous_rater_share_a_taste(world, rater_head):
    majority = torch.nonzero(world.group == 0).flatten()
    harsh = majority[world.offset[majority].argmin()]
    generous = majority[world.offset[majority].argmax()]
    x = world.test_features
    z = rater_head.taste_of(torch.stack([harsh, generous]))
    with torch.no_grad():
        utility_harsh = rater_head.score(x, z[0].expand(len(x), -1))
        utility_generous = rater_head.score(x, z[1].expand(len(x), -1))
        rating_gap = (
            rater_head.predict_rating(x, generous.expand(len(x)))
            - rater_head.predict_rating(x, harsh.expand(len(x)))
        ).mean()
    assert pairwise_accuracy(utility_harsh, utility_generous) > 0.9
    true_gap = world.offset[generous] - world.offset[harsh]  # 3.7 points on this world
    assert abs(rating_gap - true_gap) < 0.5


def test_null_taste_learns_the_population_preference(world, rater_head):
    # the population mean utility is 0.7 w.x - 0.3 w.x = 0.4 w.x: the majority's ranking
    with torch.no_grad():
        null_scores = rater_head.score(world.test_features, None)
    assert pairwise_accuracy(null_scores, world.test_utility[:, 0]) > 0.8


def test_clusters_of_rater_tastes_recover_the_two_groups(world, rater_head):
    clusters = fit_clusters(rater_head.rater_tastes(), ClusterConfig(n_clusters=2))
    assert adjusted_rand_index(clusters.labels, world.group) >= 0.9
    assert clusters.shares.tolist() == pytest.approx([0.7, 0.3], abs=0.05)
    # each centroid taste ranks the test items as its group does
    with torch.no_grad():
        for k, group in enumerate([0, 1]):
            gold = world.test_utility[:, world.group.tolist().index(group)]
            acc = pairwise_accuracy(clusters.score(rater_head, world.test_features, k), gold)
            assert acc > 0.9


def test_bradley_terry_on_pairs_alone_learns_both_tastes(world):
    g = torch.Generator().manual_seed(1)
    rater = torch.arange(N_RATERS).repeat_interleave(150)
    idx_a = torch.randint(len(world.features), rater.shape, generator=g)
    idx_b = torch.randint(len(world.features), rater.shape, generator=g)
    # Bradley-Terry choices: P(a preferred) = sigmoid(scale_r * (u_r(a) - u_r(b)))
    sign = 1.0 - 2.0 * world.group.float()
    logit = world.scale[rater] * sign[rater] * (world.utility[idx_a] - world.utility[idx_b])
    winner = (torch.rand(rater.shape, generator=g) >= torch.sigmoid(logit)).float()  # 0: a won
    pairs = PairSet(world.features, idx_a, idx_b, rater, winner)
    head = build_head(
        RaterHeadConfig(feature_dim=DIM, n_raters=N_RATERS, taste_dim=4, hidden_dims=(64, 32))
    )
    fit_head(head, pairs=pairs, cfg=TRAIN)
    report = rater_report(head, world, head.rater_tastes())
    assert report.per_cluster[0] > 0.85
    assert report.per_cluster[1] > 0.85  # measured ~0.95


def test_fit_head_is_seeded_and_trains_on_scores_and_pairs_together(world):
    pairs = PairSet(
        world.features,
        torch.arange(0, 100),
        torch.arange(100, 200),
        torch.arange(100) % N_RATERS,
        torch.zeros(100),
    )
    cfg = TrainHeadConfig(epochs=3, progress=False, seed=7)
    weights = []
    for _ in range(2):
        torch.manual_seed(123)  # same initial head
        head = build_head(RaterHeadConfig(feature_dim=DIM, n_raters=N_RATERS, hidden_dims=(16,)))
        history = fit_head(head, scores=world.scores, pairs=pairs, cfg=cfg)
        weights.append(head.state_dict())
        assert len(history.train_loss) == len(history.val_loss) == 3
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_early_stopping_keeps_the_best_held_out_epoch(world):
    small = ScoreSet(
        world.features, world.scores.rater[:300], world.scores.score[:300], world.scores.item[:300]
    )
    head = build_head(MeanHeadConfig(feature_dim=DIM, hidden_dims=(256, 256), dropout=0.0))
    cfg = TrainHeadConfig(epochs=300, lr=1e-2, patience=5, holdout_fraction=0.3, progress=False)
    history = fit_head(head, scores=small, cfg=cfg)
    assert history.stopped_early
    assert len(history.train_loss) == history.best_epoch + 1 + cfg.patience < cfg.epochs
    assert history.val_loss[history.best_epoch] == min(history.val_loss)


@pytest.mark.parametrize("kind", ["mean", "rater"])
def test_save_load_round_trip_gives_identical_scores(tmp_path, world, kind):
    cfg = (
        MeanHeadConfig(feature_dim=DIM, hidden_dims=(8,))
        if kind == "mean"
        else RaterHeadConfig(feature_dim=DIM, n_raters=N_RATERS, hidden_dims=(8,))
    )
    head = build_head(cfg).eval()
    with torch.no_grad():
        for p in head.parameters():  # non-trivial values everywhere, calibration included
            p.add_(0.1 * torch.randn_like(p))
    save_head(head, tmp_path / "head", metadata={"clip_model": "toy", "rater_ids": ["a", "b"]})
    loaded = load_head(tmp_path / "head", feature_dim=DIM)
    x, rater = world.test_features[:50], torch.arange(50) % N_RATERS
    z = torch.randn(50, head.taste_dim) if head.taste_dim else None
    with torch.no_grad():
        assert torch.equal(loaded.score(x, z), head.score(x, z))
        assert torch.equal(loaded.predict_rating(x, rater), head.predict_rating(x, rater))
    assert loaded.config == head.config
    assert read_head_metadata(tmp_path / "head") == {"clip_model": "toy", "rater_ids": ["a", "b"]}
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == [
        "head.safetensors",
        "head_config.json",
    ]


def test_wrong_feature_dimension_is_a_user_error_naming_both_dims(tmp_path):
    head = build_head(RaterHeadConfig(feature_dim=DIM, n_raters=3, hidden_dims=(8,)))
    save_head(head, tmp_path / "head")
    with pytest.raises(UserError, match=r"16-dim.*768-dim"):
        load_head(tmp_path / "head", feature_dim=768)
    with pytest.raises(UserError, match=r"dimension 16, got 768"):
        head.score(torch.randn(4, 768), torch.zeros(4, head.taste_dim))
    with pytest.raises(UserError, match=r"expects \[M, 16\]"):
        fit_head(head, scores=ScoreSet(torch.randn(5, 768), torch.zeros(5).long(), torch.ones(5)))


def test_bad_ratings_are_user_errors(world):
    head = build_head(RaterHeadConfig(feature_dim=DIM, n_raters=3, hidden_dims=(8,)))
    x = world.features[:4]
    with pytest.raises(UserError, match="n_raters=6"):
        fit_head(head, scores=ScoreSet(x, torch.tensor([0, 1, 2, 5]), torch.ones(4)))
    with pytest.raises(UserError, match="NaN"):
        fit_head(
            head,
            scores=ScoreSet(x, torch.tensor([0, 1, 2, 2]), torch.tensor([1.0, 2, float("nan"), 3])),
        )
    with pytest.raises(UserError, match="raters 0..2"):
        head.taste_of(torch.tensor([3]))
    with pytest.raises(UserError, match="winner"):
        fit_head(
            head,
            pairs=PairSet(
                x, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2.0])
            ),
        )


def test_unknown_head_kind_in_a_saved_config_is_a_user_error(tmp_path):
    save_head(build_head(MeanHeadConfig(feature_dim=DIM, hidden_dims=(8,))), tmp_path / "head")
    path = tmp_path / "head" / "head_config.json"
    record = json.loads(path.read_text())
    record["config"]["kind"] = "transformer"
    path.write_text(json.dumps(record))
    with pytest.raises(UserError, match="unknown head kind 'transformer'.*mean.*rater"):
        load_head(tmp_path / "head")


# ---- the LAION aesthetic predictor v2 ----------------------------------------------------------

LAION_SHAPES = {0: (1024, 768), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}


def laion_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (out, inp) in LAION_SHAPES.items():
        state[f"layers.{i}.weight"] = torch.randn(out, inp, generator=g) / inp**0.5
        state[f"layers.{i}.bias"] = torch.randn(out, generator=g) * 0.1
    return state


def test_laion_checkpoint_scores_equal_the_manual_matmul_chain(tmp_path):
    state = laion_state()
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    head = MeanHead.from_laion_checkpoint(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    x = torch.randn(6, 768)
    x = x / x.norm(dim=1, keepdim=True)
    expected = x
    for i in LAION_SHAPES:  # Linear layers only: no activations, dropout is off at inference
        expected = expected @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    with torch.no_grad():
        got = head.score(x)
    assert got.shape == (6,)
    torch.testing.assert_close(got, expected[:, 0], rtol=1e-5, atol=1e-5)
    # and it saves and loads like any head
    save_head(head, tmp_path / "laion")
    with torch.no_grad():
        assert torch.equal(load_head(tmp_path / "laion", feature_dim=768).score(x), got)


def test_laion_checkpoint_of_the_wrong_shape_is_a_user_error(tmp_path):
    state = laion_state()
    state["layers.2.weight"] = torch.randn(128, 512)
    torch.save(state, tmp_path / "bad_shape.pth")
    with pytest.raises(UserError, match=r"layers.2 has weight \(128, 512\)"):
        MeanHead.from_laion_checkpoint(tmp_path / "bad_shape.pth")
    state = laion_state()
    del state["layers.7.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(UserError, match="not a LAION aesthetic predictor v2"):
        MeanHead.from_laion_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(UserError, match="not found"):
        MeanHead.from_laion_checkpoint(tmp_path / "absent.pth")


# ---- the factory is open to new kinds ----------------------------------------------------------


def test_a_newly_registered_head_kind_builds_saves_and_loads_through_the_factory(tmp_path):
    @dataclass
    class LinearHeadConfig:
        kind: str = "test_linear"
        feature_dim: int = DIM
        hidden_dims: tuple[int, ...] = ()

    class LinearHead(RewardHead):
        kind = "test_linear"
        config_class = LinearHeadConfig

        def __init__(self, config):
            super().__init__(config)
            self.linear = nn.Linear(config.feature_dim, 1)

        def score(self, features, z=None):
            self.check_features(features)
            return self.linear(features).squeeze(-1)

    HEAD_KINDS["test_linear"] = LinearHead
    try:
        head = build_head(LinearHeadConfig())
        save_head(head, tmp_path / "linear")
        loaded = load_head(tmp_path / "linear")
        x = torch.randn(3, DIM)
        assert isinstance(loaded, LinearHead)
        assert torch.equal(loaded.score(x), head.score(x))
    finally:
        del HEAD_KINDS["test_linear"]
