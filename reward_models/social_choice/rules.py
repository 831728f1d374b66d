"""Aggregation rules: a profile in, one social ranking of the candidates out.

Every rule returns a `SocialRanking` whose `order` lists all candidates best first and whose
`scores` [C] (indexed by candidate) are non-increasing along `order`. What a score means is rule
specific and documented on each rule.

Ties are broken deterministically: **the lower candidate index wins**. Scores closer than
`RTOL` times the largest |score| count as tied (weighted sums of float shares carry rounding
error). Kemeny, whose ties are between whole orders, keeps the lexicographically first optimal
order, which is the same rule applied position by position.

Weights count everywhere: a voter type of weight 0.42 counts 0.42 times.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from reward_models.errors import UserError
from reward_models.social_choice.pairwise import RTOL, pairwise_margins, pairwise_support
from reward_models.social_choice.profile import Profile

# C! orders are enumerated; 8! = 40,320 orders x 64 pairs is instant, 9! is 9x that and 10! is
# beyond reason. Larger elections want Copeland or maximin (also Condorcet-consistent).
KEMENY_MAX_CANDIDATES = 8


@dataclass(frozen=True, eq=False)
class SocialRanking:
    """The outcome of one rule on one profile.

    order: int [C], candidate indices best first. scores: float [C], indexed by candidate
    (not by place), non-increasing along `order`. details: rule-specific extras (the drawn
    voter of a random ballot, the rounds of instant runoff, ...).
    """

    rule: str
    candidates: tuple[str, ...]
    order: np.ndarray  # [C] int64
    scores: np.ndarray  # [C] float64
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        assert sorted(self.order.tolist()) == list(range(len(self.candidates))), self.order
        # near-ties (RTOL) are ordered by index, so scores may rise by rounding error only
        slack = len(self.candidates) * RTOL * float(np.abs(self.scores).max(initial=0.0))
        assert (np.diff(self.scores[self.order]) <= slack).all(), "scores rise along order"

    @property
    def winner(self) -> int:
        """The index of the top candidate."""
        return int(self.order[0])

    @property
    def winner_name(self) -> str:
        return self.candidates[self.winner]

    @property
    def names(self) -> list[str]:
        """Candidate names, best first."""
        return [self.candidates[c] for c in self.order]


def order_by_scores(scores: np.ndarray) -> np.ndarray:
    """Candidate indices by descending score; near-equal scores (RTOL) go lower index first."""
    tol = RTOL * float(np.abs(scores).max(initial=0.0))
    by_score = np.argsort(-scores, kind="stable")
    order, group = [], [int(by_score[0])]
    # a run of consecutive near-equal scores is one tie group, ordered by index
    for prev, cand in zip(by_score[:-1], by_score[1:]):
        if scores[prev] - scores[cand] > tol:
            order += sorted(group)
            group = []
        group.append(int(cand))
    order += sorted(group)
    return np.array(order, dtype=np.int64)


def _by_scores(profile: Profile, rule: str, scores: np.ndarray, **details) -> SocialRanking:
    scores = np.asarray(scores, dtype=np.float64)
    return SocialRanking(rule, profile.candidates, order_by_scores(scores), scores, details)


def _from_order(profile: Profile, rule: str, order, **details) -> SocialRanking:
    """A ranking given as an order; scores are places from the bottom (best = C - 1)."""
    order = np.asarray(order, dtype=np.int64)
    scores = np.empty(profile.n_candidates)
    scores[order] = np.arange(profile.n_candidates - 1, -1, -1)
    return SocialRanking(rule, profile.candidates, order, scores, details)


def _utilities(profile: Profile, rule: str) -> np.ndarray:
    if profile.utilities is None:
        ordinal = [name for name in RULES if name not in NEEDS_UTILITIES]
        raise UserError(
            f"rule {rule!r} needs cardinal utilities but this profile has only rankings; build it "
            f"with Profile.from_utilities(...) or use a ranking rule: {', '.join(ordinal)}"
        )
    return profile.utilities


# -- rules that read whole rankings ------------------------------------------------------------


def random_ballot(profile: Profile, seed: int = 0) -> SocialRanking:
    """One voter type drawn with probability proportional to its weight; its ranking is the outcome.

    Deterministic given `seed` (numpy's default_rng). Scores are places in the drawn ranking
    (best = C - 1). details: "voter" (the drawn type) and "win_probability" [C], each
    candidate's chance of coming out on top over seeds (its first-place share).
    """
    rng = np.random.default_rng(seed)
    voter = int(rng.choice(profile.n_voters, p=profile.shares))
    first_share = np.bincount(profile.rankings[:, 0], profile.shares, profile.n_candidates)
    return _from_order(
        profile, "random_ballot", profile.rankings[voter], voter=voter, win_probability=first_share
    )


def plurality(profile: Profile) -> SocialRanking:
    """Score = weight of voters ranking the candidate first."""
    scores = np.bincount(profile.rankings[:, 0], profile.weights, profile.n_candidates)
    return _by_scores(profile, "plurality", scores)


def borda(profile: Profile) -> SocialRanking:
    """Score = sum over voters of weight x (number of candidates ranked below it), in [0, W(C-1)].

    Linear in the weights. For full rankings it equals (row sum of margins + W (C - 1)) / 2,
    so it is a function of the margin matrix; it is also the limit that a pairwise (Bradley-Terry)
    reward model reaches with complete comparison data.
    """
    points = profile.n_candidates - 1 - profile.positions  # [V, C]
    return _by_scores(profile, "borda", profile.weights @ points)


def instant_runoff(profile: Profile) -> SocialRanking:
    """Repeatedly drop the candidate with the least first-choice weight among those left.

    Each voter's weight goes to their highest-ranked remaining candidate. Elimination runs until
    one candidate is left (a candidate with a majority is never the one dropped, so stopping at
    a majority would elect the same winner); the order is the reverse order of elimination.
    Among candidates tied for fewest votes the higher index is dropped. Scores = rounds survived
    (first dropped = 0, winner = C - 1). details: "rounds", the tallies [C] of each round
    (dropped candidates show 0).
    """
    n_cand = profile.n_candidates
    alive = np.ones(n_cand, dtype=bool)
    tol = RTOL * profile.total_weight
    eliminated, rounds = [], []
    while alive.sum() > 1:
        # each voter's first choice among those alive: the first alive entry of their ranking
        first_alive = np.argmax(alive[profile.rankings], axis=1)  # [V]
        top = profile.rankings[np.arange(profile.n_voters), first_alive]
        tally = np.bincount(top, profile.weights, n_cand)
        rounds.append(tally)
        fewest = tally[alive].min()
        candidates_out = np.flatnonzero(alive & (tally <= fewest + tol))
        loser = int(candidates_out.max())
        alive[loser] = False
        eliminated.append(loser)
    order = [int(np.flatnonzero(alive)[0])] + eliminated[::-1]
    return _from_order(profile, "instant_runoff", order, rounds=rounds)


# -- rules that read only the pairwise margins -------------------------------------------------


def copeland(profile: Profile, tie_value: float = 0.5) -> SocialRanking:
    """Score = pairwise majority wins + tie_value x pairwise ties (Copeland^alpha, default 1/2)."""
    margins = pairwise_margins(profile)
    tol = RTOL * profile.total_weight
    wins = (margins > tol).sum(axis=1)
    ties = (np.abs(margins) <= tol).sum(axis=1) - 1  # minus the diagonal
    return _by_scores(profile, "copeland", wins + tie_value * ties, tie_value=tie_value)


def maximin(profile: Profile) -> SocialRanking:
    """Simpson-Kramer: score = the candidate's worst pairwise margin (its heaviest defeat, < 0).

    With full rankings the margin, winning-votes and pairwise-opposition variants elect alike,
    because support[a, b] + support[b, a] is the total weight for every pair.
    """
    margins = pairwise_margins(profile)
    np.fill_diagonal(margins, np.inf)
    scores = margins.min(axis=1) if profile.n_candidates > 1 else np.zeros(1)
    return _by_scores(profile, "maximin", scores)


@lru_cache(maxsize=KEMENY_MAX_CANDIDATES)
def _orders_and_precedence(n_cand: int) -> tuple[np.ndarray, np.ndarray]:
    """All C! orders in lexicographic order [N, C], and before[n, a, b] = a precedes b [N, C, C]."""
    orders = np.array(list(itertools.permutations(range(n_cand))), dtype=np.int64)
    places = np.argsort(orders, axis=1)
    return orders, places[:, :, None] < places[:, None, :]


def kemeny(profile: Profile) -> SocialRanking:
    """The order that agrees with the most voter weight, summed over all candidate pairs.

    Exact, by enumerating all C! orders (C <= KEMENY_MAX_CANDIDATES). Agreement of an order =
    sum over pairs it puts a above b of support[a, b]. Among optimal orders the
    lexicographically first wins (lower index first). Scores are places (best = C - 1);
    details: "agreement" (the optimum, in weight units) and "n_optimal" (orders attaining it).
    """
    n_cand = profile.n_candidates
    if n_cand > KEMENY_MAX_CANDIDATES:
        raise UserError(
            f"rule 'kemeny' enumerates all C! orders and allows at most {KEMENY_MAX_CANDIDATES} "
            f"candidates; this profile has {n_cand}; use 'copeland' or 'maximin' (also "
            "Condorcet-consistent) or aggregate fewer candidates"
        )
    orders, before = _orders_and_precedence(n_cand)
    agreement = np.einsum("nab,ab->n", before, pairwise_support(profile))  # [C!]
    best = agreement.max()
    optimal = np.flatnonzero(agreement >= best - RTOL * max(abs(best), profile.total_weight))
    return _from_order(
        profile, "kemeny", orders[optimal[0]], agreement=float(best), n_optimal=int(optimal.size)
    )


# -- rules that read cardinal utilities --------------------------------------------------------


def utilitarian(profile: Profile) -> SocialRanking:
    """Score = weighted mean utility over voters."""
    return _by_scores(profile, "utilitarian", profile.shares @ _utilities(profile, "utilitarian"))


def egalitarian(profile: Profile) -> SocialRanking:
    """Score = the lowest utility any voter type with positive weight gets (Rawlsian maximin)."""
    utilities = _utilities(profile, "egalitarian")[profile.weights > 0]
    return _by_scores(profile, "egalitarian", utilities.min(axis=0))


def nash(profile: Profile) -> SocialRanking:
    """Score = weighted mean of log utilities (the log of the weighted geometric mean).

    Utilities must be positive: the Nash product is scale-free only on a ratio scale with a
    true zero. Shift them (u - min + eps) deliberately if they are not.
    """
    utilities = _utilities(profile, "nash")
    if (utilities <= 0).any():
        v, c = np.argwhere(utilities <= 0)[0]
        raise UserError(
            f"rule 'nash' takes logs of utilities, which must be > 0; voter type {v} gives "
            f"candidate {profile.candidates[c]!r} {utilities[v, c]:g}; shift the utilities above "
            "0 (e.g. u - u.min() + 1e-3) or use 'utilitarian'"
        )
    return _by_scores(profile, "nash", profile.shares @ np.log(utilities))


# -- entry point -------------------------------------------------------------------------------

RULES: dict[str, Callable[..., SocialRanking]] = {
    "random_ballot": random_ballot,
    "plurality": plurality,
    "borda": borda,
    "copeland": copeland,
    "maximin": maximin,
    "kemeny": kemeny,
    "instant_runoff": instant_runoff,
    "utilitarian": utilitarian,
    "egalitarian": egalitarian,
    "nash": nash,
}
NEEDS_UTILITIES = frozenset({"utilitarian", "egalitarian", "nash"})


def aggregate(profile: Profile, rule: str, **kw) -> SocialRanking:
    """Aggregate `profile` with the rule named `rule` (a key of RULES); `kw` are its options.

    Options: random_ballot(seed=0), copeland(tie_value=0.5); the others take none.
    """
    if not isinstance(profile, Profile):
        raise UserError(
            f"aggregate needs a Profile, got {type(profile).__name__}; build one with "
            "Profile.from_rankings(...) or Profile.from_utilities(...)"
        )
    if rule not in RULES:
        raise UserError(f"unknown aggregation rule {rule!r}; valid rules: {', '.join(RULES)}")
    fn = RULES[rule]
    try:
        inspect.signature(fn).bind(profile, **kw)
    except TypeError:
        options = list(inspect.signature(fn).parameters)[1:]
        raise UserError(
            f"rule {rule!r} takes options {options or 'none'}; got {sorted(kw)}"
        ) from None
    return fn(profile, **kw)
