"""The social reward head: a mean-shaped head trained to reproduce an aggregated social order.

The electorate's vote ranks only the candidates it saw; the trainer needs a reward for any image.
So a `MeanHead` r(x) is fitted to the social ranking of the candidates' features and saved like
every other head (`load_head(dir)`; the trainer's mean objective calls `head.score(x, None)`).

Loss: Bradley-Terry on every pair of candidates, the target being the social order (a above b
when the rule ranks it higher, 0.5 when the rule's scores tie). Pairwise rather than list-wise
(Plackett-Luce) because pairs are all an order says for every rule alike (Copeland's and
Kemeny's scores are not utilities), because `fit_head` already trains Bradley-Terry with early
stopping, and because all C (C - 1) / 2 pairs of one full order carry the same information as
the list.

    head = fit_social_head(features, result, MeanHeadConfig(hidden_dims=(128, 32)))
    save_head(head, "runs/social/borda/head", metadata={"rule": "borda", ...})
"""

from __future__ import annotations

import dataclasses

import torch

from reward_models.errors import UserError
from reward_models.heads import MeanHead, MeanHeadConfig, build_head
from reward_models.social_choice.pairwise import RTOL
from reward_models.social_choice.rules import SocialRanking
from reward_models.train import PairSet, TrainHeadConfig, fit_head


def social_pairs(features: torch.Tensor, ranking: SocialRanking) -> PairSet:
    """Every candidate pair (a < b by index) labelled by the social ranking: P = C (C - 1) / 2.

    features [C, D], row c = candidate c. winner = 0 where the rule ranks a higher, 1 where b,
    0.5 where the rule's scores tie (the index tie-break of `order` is not a preference).
    """
    n_cand = len(ranking.candidates)
    if features.ndim != 2 or features.shape[0] != n_cand:
        raise UserError(
            f"social head: {n_cand} ranked candidates but features of shape "
            f"{tuple(features.shape)}; give one feature row per candidate, in candidate order"
        )
    if n_cand < 2:
        raise UserError("social head: a ranking of one candidate says nothing; give 2 or more")
    idx_a, idx_b = torch.triu_indices(n_cand, n_cand, offset=1)
    scores = torch.as_tensor(ranking.scores, dtype=torch.float64)
    place = torch.empty(n_cand, dtype=torch.long)
    place[torch.as_tensor(ranking.order)] = torch.arange(n_cand)
    winner = (place[idx_a] > place[idx_b]).float()  # b placed above a
    tol = RTOL * float(scores.abs().max())
    winner[(scores[idx_a] - scores[idx_b]).abs() <= tol] = 0.5
    return PairSet(features, idx_a, idx_b, torch.zeros_like(idx_a), winner)


def fit_social_head(
    features: torch.Tensor,
    ranking: SocialRanking,
    head_cfg: MeanHeadConfig | None = None,
    train_cfg: TrainHeadConfig | None = None,
) -> MeanHead:
    """A MeanHead trained on the pairs of a social ranking of candidates with features [C, D].

    Deterministic given `train_cfg.seed` (which also seeds torch's global generator, as
    `fit_head` does).
    """
    head_cfg = dataclasses.replace(head_cfg or MeanHeadConfig(), feature_dim=features.shape[1])
    train_cfg = train_cfg or TrainHeadConfig()
    torch.manual_seed(train_cfg.seed)  # the initial weights too, so one seed gives one head
    head = build_head(head_cfg)
    fit_head(head, pairs=social_pairs(features, ranking), cfg=train_cfg)
    return head
