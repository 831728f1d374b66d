"""Pairwise majorities: how much weight ranks a above b, the margin matrix, the Condorcet winner.

Many rules (Copeland, maximin, Kemeny, and, for full rankings, Borda) read only the margin
matrix. Rules that read whole rankings (plurality, instant runoff, random ballot) can tell apart
profiles that it cannot; see `tests/test_social_choice.py`.
"""

from __future__ import annotations

import numpy as np

from reward_models.social_choice.profile import Profile

# Weighted sums are floats (0.42 + 0.26 ...): two quantities closer than this share of the
# total weight (or of the largest score) count as equal, so that a tie on paper stays a tie
# and is broken by candidate index, not by rounding error.
RTOL = 1e-9


def pairwise_support(profile: Profile) -> np.ndarray:
    """support[a, b] = total weight of voters ranking a above b: float [C, C], zero diagonal."""
    positions = profile.positions  # [V, C]
    support = np.empty((profile.n_candidates, profile.n_candidates))
    # one row at a time keeps memory at [V, C] for large simulated electorates
    for a in range(profile.n_candidates):
        support[a] = profile.weights @ (positions[:, a : a + 1] < positions)
    return support


def pairwise_margins(profile: Profile) -> np.ndarray:
    """margins[a, b] = weight preferring a to b minus weight preferring b to a: [C, C].

    Antisymmetric with a zero diagonal; in the same units as the weights (shares give margins
    in [-1, 1]).
    """
    support = pairwise_support(profile)
    return support - support.T


def beats(profile: Profile) -> np.ndarray:
    """beats[a, b] = True where a strict majority of the weight prefers a to b: bool [C, C]."""
    return pairwise_margins(profile) > RTOL * profile.total_weight


def condorcet_winner(profile: Profile) -> int | None:
    """The candidate who beats every other one in a head-to-head majority, or None.

    Strict: a pairwise tie disqualifies. At most one candidate can qualify.
    """
    wins = beats(profile).sum(axis=1)
    winners = np.flatnonzero(wins == profile.n_candidates - 1)
    assert winners.size <= 1, "two candidates cannot both beat each other"
    return int(winners[0]) if winners.size else None
