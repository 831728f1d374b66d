"""Axioms the rules are known to satisfy, checked on random weighted profiles (hypothesis).

Profiles: 3-5 candidates, 1-9 voter types, weights in [0.01, 1], integer utilities in 1..20
(positive, so Nash applies; small integers so that equal utilities, and hence the tie rule,
come up often).
"""

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from reward_models.social_choice import (
    RULES,
    Profile,
    aggregate,
    condorcet_winner,
    pairwise_margins,
    pairwise_support,
)

SETTINGS = settings(max_examples=80, deadline=None)

weights_st = st.floats(0.01, 1.0, allow_nan=False)


@st.composite
def utility_profiles(draw) -> Profile:
    n_cand = draw(st.integers(3, 5))
    n_voters = draw(st.integers(1, 9))
    cells = st.lists(st.integers(1, 20), min_size=n_cand, max_size=n_cand)
    utilities = np.array(draw(st.lists(cells, min_size=n_voters, max_size=n_voters)), float)
    weights = draw(st.lists(weights_st, min_size=n_voters, max_size=n_voters))
    return Profile.from_utilities(utilities, weights)


@st.composite
def ranking_profiles(draw) -> Profile:
    n_cand = draw(st.integers(3, 5))
    n_voters = draw(st.integers(1, 9))
    ballots = draw(st.lists(st.permutations(range(n_cand)), min_size=n_voters, max_size=n_voters))
    weights = draw(st.lists(weights_st, min_size=n_voters, max_size=n_voters))
    return Profile.from_rankings(ballots, weights)


@st.composite
def unanimous_profiles(draw) -> tuple[Profile, int]:
    """A utility profile in which every voter type ranks one drawn candidate first."""
    profile = draw(utility_profiles())
    favourite = draw(st.integers(0, profile.n_candidates - 1))
    utilities = np.array(profile.utilities)
    # lift the favourite to each voter's best; a lift of 0 makes it tie the best, which leads
    # the ranking only when the favourite has the lower index (the tie rule under test)
    lift = draw(st.integers(0, 3))
    utilities[:, favourite] = utilities.max(axis=1) + lift
    profile = Profile.from_utilities(utilities, profile.weights)
    assume((profile.rankings[:, 0] == favourite).all())
    return profile, favourite


@SETTINGS
@given(unanimous_profiles(), st.integers(0, 2**16))
def test_unanimity_a_candidate_everyone_ranks_first_wins_under_every_rule(case, seed):
    profile, favourite = case
    assert (profile.rankings[:, 0] == favourite).all()
    for rule in RULES:
        kw = {"seed": seed} if rule == "random_ballot" else {}
        assert aggregate(profile, rule, **kw).winner == favourite, rule


@SETTINGS
@given(ranking_profiles())
def test_condorcet_consistency_of_copeland_maximin_and_kemeny(profile):
    winner = condorcet_winner(profile)
    assume(winner is not None)
    for rule in ["copeland", "maximin", "kemeny"]:
        assert aggregate(profile, rule).winner == winner, rule


@SETTINGS
@given(ranking_profiles(), st.data())
def test_majority_criterion_for_plurality_and_instant_runoff(profile, data):
    # move one candidate to the top of a random subset of ballots; keep cases where that subset
    # holds a strict majority of the weight
    favourite = data.draw(st.integers(0, profile.n_candidates - 1))
    bloc = np.array(
        data.draw(st.lists(st.booleans(), min_size=profile.n_voters, max_size=profile.n_voters))
    )
    assume(profile.weights[bloc].sum() > 0.5 * profile.total_weight * (1 + 1e-6))
    ballots = [
        [favourite] + [c for c in ballot if c != favourite] if in_bloc else list(ballot)
        for ballot, in_bloc in zip(profile.rankings.tolist(), bloc)
    ]
    majority = Profile.from_rankings(ballots, profile.weights)
    assert aggregate(majority, "plurality").winner == favourite
    assert aggregate(majority, "instant_runoff").winner == favourite


@SETTINGS
@given(ranking_profiles(), st.data())
def test_borda_scores_are_linear_in_voter_weights(profile, data):
    other = np.array(
        data.draw(st.lists(weights_st, min_size=profile.n_voters, max_size=profile.n_voters))
    )
    rankings = profile.rankings.tolist()
    one = aggregate(Profile.from_rankings(rankings, profile.weights), "borda").scores
    two = aggregate(Profile.from_rankings(rankings, other), "borda").scores
    both = aggregate(Profile.from_rankings(rankings, profile.weights + other), "borda").scores
    np.testing.assert_allclose(both, one + two, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(ranking_profiles())
def test_margins_are_antisymmetric_and_borda_is_a_function_of_them(profile):
    support, margins = pairwise_support(profile), pairwise_margins(profile)
    total, n_cand = profile.total_weight, profile.n_candidates
    np.testing.assert_allclose(margins, -margins.T, atol=1e-12)
    # with full rankings every voter takes a side on every pair
    off_diagonal = ~np.eye(n_cand, dtype=bool)
    np.testing.assert_allclose((support + support.T)[off_diagonal], total)
    borda = aggregate(profile, "borda").scores
    np.testing.assert_allclose(borda, (margins.sum(axis=1) + total * (n_cand - 1)) / 2, atol=1e-9)


@SETTINGS
@given(utility_profiles(), st.integers(0, 2**16))
def test_every_rule_returns_a_full_order_with_scores_non_increasing_along_it(profile, seed):
    for rule in RULES:
        result = aggregate(profile, rule, **({"seed": seed} if rule == "random_ballot" else {}))
        assert sorted(result.order.tolist()) == list(range(profile.n_candidates)), rule
        assert (np.diff(result.scores[result.order]) <= 1e-9).all(), rule


@SETTINGS
@given(ranking_profiles())
def test_kemeny_agrees_with_voters_at_least_as_well_as_any_other_rule(profile):
    support = pairwise_support(profile)

    def agreement(order) -> float:
        return sum(support[a, b] for i, a in enumerate(order) for b in order[i + 1 :])

    best = aggregate(profile, "kemeny")
    assert np.isclose(agreement(best.order.tolist()), best.details["agreement"])
    for rule in ["plurality", "borda", "copeland", "maximin", "instant_runoff"]:
        order = aggregate(profile, rule).order.tolist()
        assert agreement(order) <= best.details["agreement"] + 1e-9, rule
