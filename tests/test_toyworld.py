"""The toy taste world: images, gold utilities and rating tables behave as their definitions say."""

import pandas as pd
import pytest
import torch

from plural_diffusion.toyworld.images import make_images
from plural_diffusion.toyworld.raters import (
    default_clusters,
    gold_cluster_utility,
    gold_utility,
    make_raters,
    pixel_stats,
)
from plural_diffusion.toyworld.ratings import ToyWorldConfig, load_world, write_world


def flat(rgb, size=16):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size)


DARK_GREY = flat([0.1, 0.1, 0.1])
BRIGHT_WARM = flat([0.95, 0.85, 0.7])
VIVID = flat([0.9, 0.1, 0.8])
MID_GREY = flat([0.5, 0.5, 0.5])


def test_pixel_stats_of_flat_colours():
    stats = pixel_stats(torch.cat([DARK_GREY, VIVID]))
    assert stats[0].tolist() == pytest.approx([0.1, 0.0, 0.5, 0.0], abs=1e-5)
    luma = 0.299 * 0.9 + 0.587 * 0.1 + 0.114 * 0.8
    assert stats[1].tolist() == pytest.approx([luma, 0.8, 0.55, 0.0], abs=1e-5)


def test_each_cluster_prefers_the_image_its_definition_names():
    raters = make_raters(10)
    u = gold_cluster_utility(torch.cat([DARK_GREY, BRIGHT_WARM, VIVID, MID_GREY]), raters)
    noir, sunny, vivid = range(3)
    assert raters.cluster_names == ["noir", "sunny", "vivid"]
    assert u[:, noir].argmax() == 0  # dark
    assert u[:, sunny].argmax() == 1  # bright
    assert u[:, vivid].argmax() == 2  # saturated
    # the conflict the project is about: noir and sunny rank dark vs bright in opposite orders
    assert u[0, noir] > 0.8 and u[0, sunny] < 0.05
    assert u[1, sunny] > 0.8 and u[1, noir] < 0.05


def test_mid_grey_compromise_pleases_no_cluster_much():
    raters = make_raters(10)
    u = gold_cluster_utility(torch.cat([DARK_GREY, BRIGHT_WARM, VIVID, MID_GREY]), raters)
    best_per_cluster = u[:3].amax(dim=0)
    assert (u[3] < 0.6 * best_per_cluster).all()


def test_raters_split_by_unequal_shares_and_follow_their_cluster():
    raters = make_raters(60)
    assert raters.cluster.bincount().tolist() == [36, 18, 6]
    images = make_images(300, seed=3).images
    per_rater = gold_utility(images, raters)  # [B, R]
    per_cluster = gold_cluster_utility(images, raters)  # [B, K]
    for r in range(len(raters)):
        corr = torch.corrcoef(torch.stack([per_rater[:, r], per_cluster[:, raters.cluster[r]]]))
        assert corr[0, 1] > 0.9, f"rater {r} strays from its cluster"


def test_images_are_deterministic_from_the_seed():
    a, b, c = make_images(20, seed=7), make_images(20, seed=7), make_images(20, seed=8)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (20, 3, 32, 32)
    assert a.images.min() >= 0 and a.images.max() <= 1


def test_captions_describe_the_pixels():
    s = make_images(400, seed=1)
    luma = pixel_stats(s.images)[:, 0]
    dark = torch.tensor([c.startswith("a dark") for c in s.captions])
    bright = torch.tensor([c.startswith("a bright") for c in s.captions])
    assert luma[dark].mean() + 0.25 < luma[bright].mean()
    vivid = torch.tensor([" vivid " in c for c in s.captions])
    grey = torch.tensor([" grey " in c for c in s.captions])
    colour = pixel_stats(s.images)[:, 1]
    assert colour[grey].mean() + 0.2 < colour[vivid].mean()


SMALL = dict(n_images=120, n_raters=20, scores_per_rater=15, pairs_per_rater=30)


def test_world_tables_are_incomplete_noisy_and_deterministic(tmp_path):
    cfg = ToyWorldConfig(**SMALL)
    w1 = write_world(cfg, tmp_path / "a", progress=False)
    write_world(cfg, tmp_path / "b", progress=False)
    for name in ("scores.csv", "pairs.csv", "images.csv", "raters.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    scores = pd.read_csv(tmp_path / "a" / "scores.csv")
    assert list(scores.columns) == ["image", "rater_id", "score"]
    assert len(scores) == 20 * 15  # each rater saw 15 of 120 images
    assert scores.groupby("rater_id").image.nunique().eq(15).all()
    assert scores.score.between(0, 10).all() and (scores.score % 1 == 0).all()
    assert all((tmp_path / "a" / p).is_file() for p in scores.image.unique())
    # noisy but informative: a rater's scores track their gold utility
    u = gold_utility(w1.images.images, w1.raters)
    idx = scores.image.str.slice(11, 16).astype(int).to_numpy()
    rater = scores.rater_id.str.slice(6).astype(int).to_numpy()
    gold = u[idx, rater].numpy()
    corr = pd.Series(gold).corr(scores.score.reset_index(drop=True))
    assert 0.6 < corr < 0.99


def test_pair_winners_mostly_have_higher_gold_utility(tmp_path):
    w = write_world(ToyWorldConfig(**SMALL), tmp_path, progress=False)
    pairs = pd.read_csv(tmp_path / "pairs.csv")
    u = gold_utility(w.images.images, w.raters)
    ia = pairs.image_a.str.slice(11, 16).astype(int).to_numpy()
    ib = pairs.image_b.str.slice(11, 16).astype(int).to_numpy()
    r = pairs.rater_id.str.slice(6).astype(int).to_numpy()
    a_better = (u[ia, r] > u[ib, r]).numpy()
    agree = (a_better == (pairs.winner == "a").to_numpy()).mean()
    assert 0.75 < agree < 1.0
    assert (ia != ib).all()


def test_load_world_rebuilds_the_same_gold_raters(tmp_path):
    w = write_world(ToyWorldConfig(**SMALL, format="parquet"), tmp_path, progress=False)
    back = load_world(tmp_path)
    assert back.table("scores").suffix == ".parquet"
    assert len(pd.read_parquet(back.table("scores"))) == 20 * 15
    images = w.images.images[:8]
    assert torch.equal(gold_utility(images, w.raters), gold_utility(images, back.raters))


def test_custom_clusters_from_config():
    clusters = default_clusters()[:2]
    clusters[0].share, clusters[1].share = 0.5, 0.5
    raters = make_raters(10, clusters)
    assert raters.cluster.bincount().tolist() == [5, 5]
