"""One social vote over candidate images: electorate -> profile -> rule -> social head, saved.

    vote = social_vote(run.rater, run.rater.rater_tastes(), features, names, "borda", cfg)
    head = fit_social_head(features, vote.ranking, head_cfg, train_cfg)
    save_social_vote(vote, head, "runs/social/borda")   # ranking.json + head/, one rename

What `reward-models social` runs; the saved `head/` loads with `load_head` like any head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from reward_models.errors import UserError
from reward_models.heads import RewardHead, save_head
from reward_models.io import atomic_dir, write_json
from reward_models.social_choice.electorate import (
    Electorate,
    ElectorateConfig,
    simulate_electorate,
)
from reward_models.social_choice.pairwise import condorcet_winner
from reward_models.social_choice.profile import Profile
from reward_models.social_choice.rules import RULES, SocialRanking, aggregate

RANKING_NAME = "ranking.json"
HEAD_DIR = "head"


def check_rule(rule: str) -> str:
    """`rule` if it names an aggregation rule, else a UserError listing the valid ones."""
    if rule not in RULES:
        raise UserError(f"unknown aggregation rule {rule!r}; valid rules: {', '.join(RULES)}")
    return rule


@dataclass(frozen=True)
class SocialVote:
    """The outcome of one vote: who voted (electorate), how (profile), and the result."""

    ranking: SocialRanking
    profile: Profile
    electorate: Electorate
    condorcet: int | None  # index of the Condorcet winner, if there is one
    config: ElectorateConfig

    def record(self) -> dict:
        """JSON-able summary: the order with names and scores, rule, electorate, winner."""
        r = self.ranking
        density = self.electorate.density
        return {
            "rule": r.rule,
            "order": [
                {"place": i + 1, "candidate": r.candidates[c], "score": float(r.scores[c])}
                for i, c in enumerate(r.order.tolist())
            ],
            "condorcet_winner": None if self.condorcet is None else r.candidates[self.condorcet],
            "n_voters": self.electorate.n_voters,
            "seed": self.electorate.seed,
            "weighting": self.config.weighting,
            "components": density.n_components,
            "component_shares": density.shares.tolist(),
            "bic": {str(k): v for k, v in density.bic.items()},
        }


def social_vote(
    head: RewardHead,
    tastes: torch.Tensor,
    features: torch.Tensor,
    candidates: Sequence[str] | None,
    rule: str,
    cfg: ElectorateConfig | None = None,
) -> SocialVote:
    """Simulate voters from the density of `tastes` [R, d], let each rank the candidates by
    `head.score(x, z)`, and aggregate with `rule`.

    features [C, D], one row per candidate; candidates: C names, or None for "0", "1", ... .
    """
    cfg = cfg or ElectorateConfig()
    check_rule(rule)
    electorate = simulate_electorate(tastes, cfg)
    profile = electorate.profile(head, features, candidates)
    options = {"seed": cfg.seed} if rule == "random_ballot" else {}
    ranking = aggregate(profile, rule, **options)
    return SocialVote(ranking, profile, electorate, condorcet_winner(profile), cfg)


def save_social_vote(
    vote: SocialVote, head: RewardHead, out_dir: str | Path, metadata: dict | None = None
) -> Path:
    """Write `out_dir/ranking.json` and the social head `out_dir/head/` in one atomic step.

    The head's metadata records the rule, n_voters and seed (plus `metadata`). An earlier vote
    in `out_dir` is replaced; any other non-empty folder is refused, since it would be too.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / RANKING_NAME).is_file() and any(out_dir.iterdir()):
        raise UserError(
            f"{out_dir} exists and holds no {RANKING_NAME}; writing there would replace its "
            "contents, so choose a new or empty output folder"
        )
    record = {**vote.record(), **(metadata or {}), "head": HEAD_DIR}
    head_meta = {
        "social": {
            "rule": vote.ranking.rule,
            "n_voters": vote.electorate.n_voters,
            "seed": vote.electorate.seed,
            "weighting": vote.config.weighting,
            "components": vote.electorate.density.n_components,
            "candidates": len(vote.ranking.candidates),
        },
        **(metadata or {}),
    }
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / RANKING_NAME, record)
        save_head(head, tmp / HEAD_DIR, metadata=head_meta)
    return out_dir
