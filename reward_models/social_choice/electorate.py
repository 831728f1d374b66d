"""A simulated electorate: voters drawn from the density of the raters' tastes, voting by reward.

A rater-aware head knows each rater's taste z_i, but the raters who happened to rate are not the
population: a taste group can be thinly sampled, and each rater saw only a few images. So the
electorate is drawn from a density fitted to all the raters' tastes (a Gaussian mixture with
diagonal covariances, its number of components chosen by BIC), and every simulated voter ranks
every candidate by its own conditioned utility r(x, z):

    electorate = simulate_electorate(run.rater.rater_tastes(), ElectorateConfig(n_voters=1000))
    profile = electorate.profile(run.rater, features, candidates=names)      # features [C, D]
    result = aggregate(profile, "borda")

Voters are weighted: "population" weighting counts every voter once, so taste groups count by
their share of the raters; "equal_groups" weights voters so that every mixture component
(taste group) counts the same, however few raters it had.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from reward_models.clusters import ClusterConfig, gmm_by_bic
from reward_models.errors import UserError
from reward_models.heads import RewardHead
from reward_models.social_choice.profile import Profile

# rows of one head.score call when scoring voters x candidates (a [rows, D] float block)
SCORE_ROWS = 65_536


@dataclass
class ElectorateConfig:
    n_voters: int = 1000
    seed: int = 0  # the draw of the voters; the mixture fit uses it too
    max_components: int = 8  # BIC chooses K in 1..min(max_components, raters - 1)
    n_init: int = 3  # EM restarts per K
    weighting: Literal["population", "equal_groups"] = "population"


@dataclass(frozen=True)
class TasteDensity:
    """A Gaussian mixture with diagonal covariances over taste vectors.

    means, variances: [K, d]; shares: [K], sums to 1; bic: K -> BIC of every K tried.
    """

    means: np.ndarray
    variances: np.ndarray
    shares: np.ndarray
    bic: dict[int, float]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """n tastes [n, d] and the component each came from [n], deterministic in `seed`."""
        rng = np.random.default_rng(seed)
        component = rng.choice(self.n_components, size=n, p=self.shares)
        noise = rng.standard_normal((n, self.means.shape[1]))
        return self.means[component] + np.sqrt(self.variances[component]) * noise, component


def fit_taste_density(tastes: torch.Tensor, cfg: ElectorateConfig) -> TasteDensity:
    """Fit a diagonal-covariance Gaussian mixture to raters' tastes [R, d], K by lowest BIC."""
    if tastes.ndim != 2 or tastes.shape[0] < 2 or not torch.isfinite(tastes).all():
        raise UserError(
            f"a taste density needs a finite [R >= 2, d] matrix of rater tastes; got shape "
            f"{tuple(tastes.shape)}"
        )
    x = tastes.detach().double().cpu().numpy()
    # the same mixture as the taste clusters (clusters.py), so one K means one thing
    gmm_cfg = ClusterConfig(covariance_type="diag", n_init=cfg.n_init, seed=cfg.seed)
    best, bic = gmm_by_bic(x, cfg.max_components, gmm_cfg)
    return TasteDensity(best.means_, best.covariances_, best.weights_, bic)


@dataclass(frozen=True)
class Electorate:
    """V simulated voters: tastes [V, d], mixture component [V], weight [V] (>= 0)."""

    tastes: np.ndarray
    component: np.ndarray
    weights: np.ndarray
    density: TasteDensity
    seed: int

    @property
    def n_voters(self) -> int:
        return self.tastes.shape[0]

    @torch.no_grad()
    def utilities(self, head: RewardHead, features: torch.Tensor) -> np.ndarray:
        """Each voter's utility r(x_c, z_v) for each candidate: features [C, D] -> [V, C]."""
        if head.taste_dim != self.tastes.shape[1]:
            raise UserError(
                f"the electorate holds {self.tastes.shape[1]}-dim tastes but the {head.kind} "
                f"head takes {head.taste_dim}-dim tastes; simulate it from this head's tastes"
            )
        head.eval()  # voters score without dropout
        n_cand = features.shape[0]
        z = torch.as_tensor(self.tastes, dtype=features.dtype, device=features.device)
        chunk = max(1, SCORE_ROWS // max(n_cand, 1))
        rows = []
        for z_block in z.split(chunk):  # [v, d]: score every (voter, candidate) pair at once
            pairs_z = z_block.repeat_interleave(n_cand, dim=0)  # [v * C, d]
            pairs_x = features.repeat(z_block.shape[0], 1)  # [v * C, D]
            rows.append(head.score(pairs_x, pairs_z).reshape(-1, n_cand))
        return torch.cat(rows).double().cpu().numpy()

    def profile(
        self, head: RewardHead, features: torch.Tensor, candidates: Sequence[str] | None = None
    ) -> Profile:
        """The voters' utilities for the candidates (features [C, D]) as a weighted Profile."""
        return Profile.from_utilities(self.utilities(head, features), self.weights, candidates)


def simulate_electorate(tastes: torch.Tensor, cfg: ElectorateConfig | None = None) -> Electorate:
    """Fit the taste density of raters' tastes [R, d] and draw `cfg.n_voters` voters from it."""
    cfg = cfg or ElectorateConfig()
    if cfg.n_voters < 1:
        raise UserError(f"n_voters={cfg.n_voters}: an electorate needs at least one voter")
    if cfg.weighting not in ("population", "equal_groups"):
        raise UserError(f"weighting={cfg.weighting!r}: use 'population' or 'equal_groups'")
    density = fit_taste_density(tastes, cfg)
    voters, component = density.sample(cfg.n_voters, cfg.seed)
    weights = np.ones(cfg.n_voters)
    if cfg.weighting == "equal_groups":
        # each drawn component gets total weight n_voters / (components drawn)
        counts = np.bincount(component, minlength=density.n_components)
        drawn = np.count_nonzero(counts)
        weights = cfg.n_voters / (drawn * counts[component])
    return Electorate(voters, component, weights, density, cfg.seed)
