"""Ties: a rater saw two images and preferred neither. A pairs table keeps them (winner 'tie'),
and the Bradley-Terry loss reads them as the soft label 0.5, which pulls the two utilities
together where a win pushes them apart."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from reward_models.data import load_ratings
from reward_models.heads import MeanHead, MeanHeadConfig
from reward_models.train import TrainHeadConfig, fit_head
from reward_models.workflow import Features, pair_set


def pairs_csv(path: Path, winners: list) -> Path:
    n = len(winners)
    df = pd.DataFrame(
        {
            "image_a": ["x.png"] * n,
            "image_b": ["y.png"] * n,
            "rater_id": ["r"] * n,
            "winner": winners,
        }
    )
    df.to_csv(path, index=False)
    return path


def test_our_pairs_tables_read_tie_and_half_as_a_tie(tmp_path):
    path = pairs_csv(tmp_path / "pairs.csv", ["a", "TIE", "0.5", "1"])
    pairs = load_ratings(path, check_images="none").pairs
    assert pairs.df["winner"].tolist() == ["a", "tie", "tie", "b"]
    assert pairs.ties.tolist() == [False, True, True, False]
    assert pairs.b_preferred.tolist() == [0.0, 0.5, 0.5, 1.0]


def test_a_tie_pulls_two_scores_together_where_a_win_pushes_them_apart(tmp_path):
    torch.manual_seed(0)
    features = Features(
        torch.nn.functional.normalize(torch.randn(2, 8), dim=-1), {"x.png": 0, "y.png": 1}
    )
    head = MeanHead(MeanHeadConfig(feature_dim=8, hidden_dims=(), activation="none", dropout=0.0))
    # no weight decay: only the pairs may move the gap
    cfg = TrainHeadConfig(
        epochs=60, batch_size=8, lr=0.05, weight_decay=0.0, holdout_fraction=0.0, progress=False
    )

    def gap() -> float:
        with torch.no_grad():
            score = head.score(features.matrix)
        return float(score[0] - score[1])  # utility of x minus that of y

    def fit(winners: list[str], name: str) -> None:
        data = load_ratings(pairs_csv(tmp_path / name, winners), check_images="none")
        fit_head(head, pairs=pair_set(data, features, {"r": 0}), cfg=cfg)

    start = abs(gap())
    fit(["a"] * 8, "wins.csv")  # r prefers x over y, eight times
    after_wins = gap()
    assert after_wins > start + 2.0
    fit(["tie"] * 8, "ties.csv")  # then r calls them equal, eight times
    assert abs(gap()) < 0.1 * after_wins
