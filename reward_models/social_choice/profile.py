"""A profile: C named candidates, V voter types, each type's ranking, weight and (maybe) utilities.

Every aggregation rule in `reward_models.social_choice` reads one. A voter *type* stands for a
share of the electorate (a taste cluster, a simulated voter, one rater): its weight is that
share. Weights are non-negative and need not sum to 1; rules that compare against "half the
electorate" use the total.

Rankings are strict: each row lists every candidate index once, best first. A profile built from
utilities derives its rankings by sorting each voter's utilities (highest first); equal
utilities are ordered by lower candidate index, the same tie rule the aggregation rules use.

    tn = Profile.from_rankings(
        [["Memphis", "Nashville", "Chattanooga", "Knoxville"], ...], weights=[0.42, ...]
    )
    p = Profile.from_utilities(np.array([[1.0, 0.2], [0.0, 0.5]]), weights=[2, 1])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reward_models.errors import UserError

Ballot = Sequence[str | int]


def rank_utilities(utilities: np.ndarray) -> np.ndarray:
    """Each row's candidate indices by descending utility, ties to lower index: [V, C] -> [V, C]."""
    # a stable sort of -u keeps equal utilities in index order
    return np.argsort(-utilities, axis=1, kind="stable")


def _readonly(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class Profile:
    """Who ranks the candidates how, and how much each voter type counts.

    candidates: C names. rankings: int [V, C], row v = candidate indices best first.
    weights: float [V], >= 0 with a positive total (a voter type's share of the electorate).
    utilities: float [V, C] or None; when given, `rankings` must be its sorted order.
    Arrays are copied and made read-only. Prefer the `from_rankings` / `from_utilities`
    constructors, which accept names, lists and default weights.
    """

    candidates: tuple[str, ...]
    rankings: np.ndarray  # [V, C] int64
    weights: np.ndarray  # [V] float64
    utilities: np.ndarray | None = None  # [V, C] float64

    def __post_init__(self):
        candidates = tuple(str(c) for c in self.candidates)
        if not candidates:
            raise UserError("a profile needs at least one candidate")
        if len(set(candidates)) != len(candidates):
            dupes = sorted({c for c in candidates if candidates.count(c) > 1})
            raise UserError(f"candidate names must be unique; repeated: {dupes}")
        n_cand = len(candidates)

        rankings = np.asarray(self.rankings)
        if rankings.ndim != 2 or rankings.shape[0] == 0 or rankings.shape[1] != n_cand:
            raise UserError(
                f"rankings must be [voters, {n_cand}] (one full ranking per voter type); "
                f"got shape {rankings.shape}"
            )
        if not np.issubdtype(rankings.dtype, np.integer):
            raise UserError(
                f"rankings must hold candidate indices (integers); got {rankings.dtype}"
            )
        bad = np.flatnonzero((np.sort(rankings, axis=1) != np.arange(n_cand)).any(axis=1))
        if bad.size:
            raise UserError(
                f"ranking {int(bad[0])} is {rankings[bad[0]].tolist()}, not a permutation of "
                f"0..{n_cand - 1}; list every candidate once, best first"
            )
        n_voters = rankings.shape[0]

        weights = np.asarray(self.weights, dtype=np.float64)
        if weights.shape != (n_voters,):
            raise UserError(
                f"weights must have one entry per voter type ({n_voters}); "
                f"got shape {weights.shape}"
            )
        if not np.isfinite(weights).all() or (weights < 0).any():
            v = int(np.flatnonzero(~np.isfinite(weights) | (weights < 0))[0])
            raise UserError(
                f"weight of voter type {v} is {weights[v]}; weights must be finite and >= 0"
            )
        if weights.sum() <= 0:
            raise UserError(
                "the voter weights sum to 0; give at least one voter type a positive weight"
            )

        utilities = self.utilities
        if utilities is not None:
            utilities = np.asarray(utilities, dtype=np.float64)
            if utilities.shape != rankings.shape:
                raise UserError(
                    f"utilities must be [voters, candidates] = {rankings.shape}; "
                    f"got {utilities.shape}"
                )
            if not np.isfinite(utilities).all():
                v, c = np.argwhere(~np.isfinite(utilities))[0]
                raise UserError(
                    f"utility of voter type {v} for candidate {candidates[c]!r} is "
                    f"{utilities[v, c]}; "
                    "utilities must be finite numbers"
                )
            mismatch = np.flatnonzero((rank_utilities(utilities) != rankings).any(axis=1))
            if mismatch.size:
                raise UserError(
                    f"ranking {int(mismatch[0])} does not sort that voter's utilities; build the "
                    "profile with Profile.from_utilities so rankings are derived from them"
                )

        object.__setattr__(self, "candidates", candidates)
        object.__setattr__(self, "rankings", _readonly(rankings.astype(np.int64)))
        object.__setattr__(self, "weights", _readonly(weights))
        object.__setattr__(self, "utilities", None if utilities is None else _readonly(utilities))

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_rankings(
        cls,
        rankings: Sequence[Ballot] | np.ndarray,
        weights: Sequence[float] | np.ndarray | None = None,
        candidates: Sequence[str] | None = None,
    ) -> Profile:
        """A profile from full rankings, best first, entries candidate names or indices.

        rankings: V ballots, each listing all C candidates once. weights: V shares (default 1
        each). candidates: the C names in index order; default the first ballot's order when it
        holds names, else "0", "1", ... . The candidate order matters: ties go to lower index.
        """
        ballots = [list(b) for b in rankings]
        if not ballots:
            raise UserError("a profile needs at least one voter type's ranking")
        if candidates is None:
            first = ballots[0]
            candidates = (
                [str(c) for c in first]
                if all(isinstance(c, str) for c in first)
                else [str(i) for i in range(len(first))]
            )
        candidates = tuple(str(c) for c in candidates)
        index = {name: i for i, name in enumerate(candidates)}
        rows = []
        for v, ballot in enumerate(ballots):
            row = []
            for entry in ballot:
                if isinstance(entry, str):
                    if entry not in index:
                        raise UserError(
                            f"ranking {v} names {entry!r}, not a candidate; "
                            f"candidates are {list(candidates)}"
                        )
                    row.append(index[entry])
                elif isinstance(entry, int | np.integer) and 0 <= entry < len(candidates):
                    row.append(int(entry))
                else:
                    raise UserError(
                        f"ranking {v} holds {entry!r}; entries are candidate names or "
                        f"indices 0..{len(candidates) - 1}"
                    )
            if sorted(row) != list(range(len(candidates))):
                raise UserError(
                    f"ranking {v} is {list(ballot)}; a full ranking lists each of the "
                    f"{len(candidates)} candidates {list(candidates)} exactly once, best first"
                )
            rows.append(row)
        weights = np.ones(len(rows)) if weights is None else weights
        return cls(
            candidates, np.array(rows, dtype=np.int64), np.asarray(weights, dtype=np.float64)
        )

    @classmethod
    def from_utilities(
        cls,
        utilities: np.ndarray | Sequence[Sequence[float]],
        weights: Sequence[float] | np.ndarray | None = None,
        candidates: Sequence[str] | None = None,
    ) -> Profile:
        """A profile from cardinal utilities [V, C] (higher is better); rankings by sorting.

        weights: V shares (default 1 each); candidates: C names (default "0", "1", ...). Equal
        utilities within a voter are ranked by lower candidate index.
        """
        utilities = np.asarray(utilities, dtype=np.float64)
        if utilities.ndim != 2 or utilities.shape[0] == 0 or utilities.shape[1] == 0:
            raise UserError(
                "utilities must be a non-empty [voters, candidates] table; "
                f"got shape {utilities.shape}"
            )
        if not np.isfinite(utilities).all():
            v, c = np.argwhere(~np.isfinite(utilities))[0]
            raise UserError(
                f"utility of voter type {v} for candidate {c} is {utilities[v, c]}; "
                "utilities must be finite"
            )
        n_voters, n_cand = utilities.shape
        if candidates is None:
            candidates = [str(i) for i in range(n_cand)]
        if len(candidates) != n_cand:
            raise UserError(
                f"{len(candidates)} candidate names for {n_cand} utility columns; "
                "give one name per column"
            )
        weights = np.ones(n_voters) if weights is None else weights
        return cls(
            tuple(candidates),
            rank_utilities(utilities),
            np.asarray(weights, dtype=np.float64),
            utilities,
        )

    # -- views ----------------------------------------------------------------------------------

    @property
    def n_candidates(self) -> int:
        return len(self.candidates)

    @property
    def n_voters(self) -> int:
        return int(self.rankings.shape[0])

    @property
    def total_weight(self) -> float:
        return float(self.weights.sum())

    @property
    def shares(self) -> np.ndarray:
        """Weights normalised to sum to 1: [V]."""
        return self.weights / self.weights.sum()

    @property
    def positions(self) -> np.ndarray:
        """positions[v, c] = place of candidate c in voter v's ranking, 0 = best: int [V, C]."""
        # the inverse permutation of each row
        return np.argsort(self.rankings, axis=1)

    def index(self, name: str) -> int:
        """The index of the candidate called `name`."""
        if name not in self.candidates:
            raise UserError(f"no candidate named {name!r}; candidates are {list(self.candidates)}")
        return self.candidates.index(name)

    def __repr__(self) -> str:
        kind = "utilities" if self.utilities is not None else "rankings only"
        return f"Profile({self.n_candidates} candidates, {self.n_voters} voter types, {kind})"
