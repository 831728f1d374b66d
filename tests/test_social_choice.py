"""Aggregation rules on the classic cases of social choice, with their textbook outcomes."""

import numpy as np
import pytest

from reward_models.errors import UserError
from reward_models.social_choice import (
    KEMENY_MAX_CANDIDATES,
    RULES,
    Profile,
    aggregate,
    condorcet_winner,
    pairwise_margins,
)

TENNESSEE = ["Memphis", "Nashville", "Chattanooga", "Knoxville"]


@pytest.fixture
def tennessee() -> Profile:
    """Where to put the capital: each city's voters rank the cities by distance from home."""
    return Profile.from_rankings(
        [
            ["Memphis", "Nashville", "Chattanooga", "Knoxville"],
            ["Nashville", "Chattanooga", "Knoxville", "Memphis"],
            ["Chattanooga", "Knoxville", "Nashville", "Memphis"],
            ["Knoxville", "Chattanooga", "Nashville", "Memphis"],
        ],
        weights=[0.42, 0.26, 0.15, 0.17],
        candidates=TENNESSEE,
    )


# -- Tennessee capital -------------------------------------------------------------------------


def test_tennessee_plurality_elects_memphis_on_first_places(tennessee):
    result = aggregate(tennessee, "plurality")
    assert result.winner_name == "Memphis"
    np.testing.assert_allclose(result.scores, [0.42, 0.26, 0.15, 0.17])
    assert result.names == ["Memphis", "Nashville", "Knoxville", "Chattanooga"]


def test_tennessee_nashville_is_the_condorcet_winner(tennessee):
    margins = pairwise_margins(tennessee)
    # Nashville beats Memphis 58-42 and both eastern cities 68-32
    np.testing.assert_allclose(
        margins,
        [
            [0.00, -0.16, -0.16, -0.16],
            [0.16, 0.00, 0.36, 0.36],
            [0.16, -0.36, 0.00, 0.66],
            [0.16, -0.36, -0.66, 0.00],
        ],
        atol=1e-12,
    )
    assert condorcet_winner(tennessee) == TENNESSEE.index("Nashville")


@pytest.mark.parametrize(
    "rule, scores",
    [
        ("borda", [1.26, 1.94, 1.73, 1.07]),
        ("copeland", [0, 3, 2, 1]),
        ("maximin", [-0.16, 0.16, -0.36, -0.66]),
        ("kemeny", [0, 3, 2, 1]),  # places from the bottom: N > C > K > M
    ],
)
def test_tennessee_pairwise_rules_elect_nashville(tennessee, rule, scores):
    result = aggregate(tennessee, rule)
    assert result.winner_name == "Nashville"
    np.testing.assert_allclose(result.scores, scores, atol=1e-12)


def test_tennessee_kemeny_order_follows_every_pairwise_majority(tennessee):
    result = aggregate(tennessee, "kemeny")
    assert result.names == ["Nashville", "Chattanooga", "Knoxville", "Memphis"]
    # 0.58 + 0.68 + 0.68 (Nashville) + 0.58 + 0.83 (Chattanooga) + 0.58 (Knoxville over Memphis)
    assert result.details["agreement"] == pytest.approx(3.93)
    assert result.details["n_optimal"] == 1


def test_tennessee_instant_runoff_elects_knoxville(tennessee):
    result = aggregate(tennessee, "instant_runoff")
    assert result.winner_name == "Knoxville"
    # Chattanooga (15%) goes first and its voters move to Knoxville; then Nashville (26%) goes
    # and Knoxville holds 58% against Memphis's 42%
    np.testing.assert_allclose(result.details["rounds"][0], [0.42, 0.26, 0.15, 0.17])
    np.testing.assert_allclose(result.details["rounds"][1], [0.42, 0.26, 0.00, 0.32])
    np.testing.assert_allclose(result.details["rounds"][2], [0.42, 0.00, 0.00, 0.58])
    assert result.names == ["Knoxville", "Memphis", "Nashville", "Chattanooga"]


def test_instant_runoff_drops_the_higher_index_among_those_tied_for_fewest_votes():
    profile = Profile.from_rankings(
        [["a", "b", "c"], ["b", "c", "a"], ["c", "b", "a"]], weights=[3, 2, 2], candidates="abc"
    )
    result = aggregate(profile, "instant_runoff")
    # b and c tie on 2; c goes, its voters move to b, and b beats a 4-3
    assert result.names == ["b", "a", "c"]
    np.testing.assert_allclose(result.details["rounds"][1], [3, 4, 0])


def test_random_ballot_is_seeded_and_draws_ballots_in_proportion_to_weight(tennessee):
    first = aggregate(tennessee, "random_ballot", seed=7)
    again = aggregate(tennessee, "random_ballot", seed=7)
    assert first.order.tolist() == again.order.tolist()
    # the outcome is one voter type's ballot, verbatim
    assert first.order.tolist() == tennessee.rankings[first.details["voter"]].tolist()

    winners = [aggregate(tennessee, "random_ballot", seed=s).winner for s in range(2000)]
    frequency = np.bincount(winners, minlength=4) / 2000
    # binomial standard error at 2000 draws is at most 0.011
    np.testing.assert_allclose(frequency, [0.42, 0.26, 0.15, 0.17], atol=0.035)
    np.testing.assert_allclose(first.details["win_probability"], [0.42, 0.26, 0.15, 0.17])


# -- distortion: ranks hide intensity ----------------------------------------------------------


def test_borda_picks_a_while_utilitarian_picks_e_when_intensity_is_hidden():
    # a 21% minority barely distinguishes A..E; the 79% majority loves E and hates the rest
    eps = 0.01
    profile = Profile.from_utilities(
        [
            [1.0, 0.9999, 0.9998, 0.9997, 0.9996],
            [-0.9997, -0.9998, -0.9999, -1.0, 1.0],
        ],
        weights=[0.2 + eps, 0.8 - eps],
        candidates="ABCDE",
    )
    borda = aggregate(profile, "borda")
    utilitarian = aggregate(profile, "utilitarian")
    assert borda.winner_name == "A" and utilitarian.winner_name == "E"
    # A: 0.21 x 4 + 0.79 x 3; E: 0.79 x 4
    assert borda.scores[0] == pytest.approx(3.21) and borda.scores[4] == pytest.approx(3.16)
    assert utilitarian.scores[4] == pytest.approx(0.21 * 0.9996 + 0.79 * 1.0)
    assert utilitarian.scores[0] == pytest.approx(0.21 * 1.0 - 0.79 * 0.9997)


def test_utilities_rank_ties_to_the_lower_candidate_index():
    profile = Profile.from_utilities([[0.5, 0.9, 0.5, 0.9]])
    assert profile.rankings.tolist() == [[1, 3, 0, 2]]
    assert aggregate(profile, "utilitarian").order.tolist() == [1, 3, 0, 2]


def test_egalitarian_serves_the_worst_off_and_nash_trades_off_ratios():
    # X splits the room (10 / 1), Y is a compromise (4 / 4)
    profile = Profile.from_utilities([[10.0, 4.0], [1.0, 4.0]], candidates=["X", "Y"])
    assert aggregate(profile, "utilitarian").winner_name == "X"  # 5.5 > 4
    assert aggregate(profile, "egalitarian").winner_name == "Y"  # min 4 > min 1
    nash = aggregate(profile, "nash")  # log 10 / 2 = 1.151 < log 4 = 1.386
    assert nash.winner_name == "Y"
    np.testing.assert_allclose(nash.scores, [np.log(10) / 2, np.log(4)])


def test_a_voter_type_of_weight_zero_does_not_count_for_egalitarian():
    profile = Profile.from_utilities([[1.0, 2.0], [5.0, 0.0]], weights=[1.0, 0.0])
    assert aggregate(profile, "egalitarian").winner == 1
    np.testing.assert_allclose(aggregate(profile, "egalitarian").scores, [1.0, 2.0])


# -- margins do not determine the outcome of rules that read whole rankings --------------------


def test_same_margins_different_rankings_are_told_apart_by_plurality():
    base = [(["a", "b", "c"], 2.0), (["b", "a", "c"], 1.0)]
    # each pair of mutually reversed rankings adds zero to every margin
    pair_one = [(["b", "a", "c"], 2.0), (["c", "a", "b"], 2.0)]
    pair_two = [(["a", "c", "b"], 2.0), (["b", "c", "a"], 2.0)]
    one = Profile.from_rankings(*zip(*(base + pair_one)), candidates="abc")
    two = Profile.from_rankings(*zip(*(base + pair_two)), candidates="abc")

    np.testing.assert_array_equal(pairwise_margins(one), pairwise_margins(two))
    for rule in ["borda", "copeland", "maximin", "kemeny"]:  # functions of the margins alone
        assert aggregate(one, rule).order.tolist() == aggregate(two, rule).order.tolist()
    # first places: a 2, b 3, c 2 against a 4, b 3
    assert aggregate(one, "plurality").winner_name == "b"
    assert aggregate(two, "plurality").winner_name == "a"


def test_a_condorcet_cycle_is_a_tie_that_goes_to_the_lowest_index():
    cycle = Profile.from_rankings([["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]])
    assert condorcet_winner(cycle) is None
    for rule in ["borda", "copeland", "maximin"]:
        result = aggregate(cycle, rule)
        assert result.order.tolist() == [0, 1, 2], rule
        assert np.ptp(result.scores) == 0, rule
    kemeny = aggregate(cycle, "kemeny")
    # a>b>c, b>c>a and c>a>b each agree with 5 of the 9 pairwise preferences
    assert kemeny.order.tolist() == [0, 1, 2] and kemeny.details["n_optimal"] == 3
    assert kemeny.details["agreement"] == 5


def test_kemeny_handles_eight_candidates_exactly():
    rng = np.random.default_rng(0)
    truth = rng.permutation(8)
    # 3 voters report the true order, 2 voters each swap one adjacent pair
    ballots = [truth] * 3 + [
        np.r_[truth[1], truth[0], truth[2:]],
        np.r_[truth[:5], truth[6], truth[5], truth[7]],
    ]
    result = aggregate(Profile.from_rankings(ballots), "kemeny")
    assert result.order.tolist() == truth.tolist() and result.details["n_optimal"] == 1


# -- error messages ----------------------------------------------------------------------------


def test_unknown_rule_lists_the_valid_ones(tennessee):
    with pytest.raises(UserError) as e:
        aggregate(tennessee, "bordda")
    assert "unknown aggregation rule 'bordda'" in str(e.value)
    for name in RULES:
        assert name in str(e.value)


def test_kemeny_refuses_more_than_eight_candidates():
    profile = Profile.from_rankings([list(range(9)), list(range(8, -1, -1))])
    with pytest.raises(UserError, match="at most 8 candidates; this profile has 9"):
        aggregate(profile, "kemeny")
    assert KEMENY_MAX_CANDIDATES == 8


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_nash_needs_positive_utilities(bad):
    profile = Profile.from_utilities([[1.0, 2.0], [bad, 3.0]], candidates=["X", "Y"])
    with pytest.raises(UserError, match=r"voter type 1 gives candidate 'X' .*shift the utilities"):
        aggregate(profile, "nash")


@pytest.mark.parametrize("rule", ["utilitarian", "egalitarian", "nash"])
def test_cardinal_rules_refuse_a_ranking_only_profile(tennessee, rule):
    with pytest.raises(UserError, match=f"rule '{rule}' needs cardinal utilities.*from_utilities"):
        aggregate(tennessee, rule)


def test_options_a_rule_does_not_take_are_refused(tennessee):
    with pytest.raises(UserError, match=r"rule 'borda' takes options none; got \['seed'\]"):
        aggregate(tennessee, "borda", seed=3)


@pytest.mark.parametrize(
    "rankings, weights, message",
    [
        ([["a", "b"], ["a", "a"]], None, "ranking 1 is \\['a', 'a'\\]; a full ranking lists each"),
        ([["a", "b"], ["a", "z"]], None, "ranking 1 names 'z', not a candidate"),
        ([["a", "b"], ["b"]], None, "ranking 1 is \\['b'\\]"),
        ([[0, 1], [1, 2]], None, "ranking 1 holds 2"),
        ([["a", "b"], ["b", "a"]], [1.0, -1.0], "weight of voter type 1 is -1.0"),
        ([["a", "b"], ["b", "a"]], [0.0, 0.0], "weights sum to 0"),
        ([["a", "b"], ["b", "a"]], [1.0], "one entry per voter type \\(2\\)"),
    ],
)
def test_bad_profiles_are_refused_with_the_row_named(rankings, weights, message):
    with pytest.raises(UserError, match=message):
        Profile.from_rankings(rankings, weights)


def test_non_finite_utilities_are_refused():
    with pytest.raises(UserError, match="voter type 0 for candidate 1 is nan"):
        Profile.from_utilities([[1.0, np.nan]])


def test_rankings_given_with_utilities_must_be_their_sorted_order():
    with pytest.raises(UserError, match="ranking 0 does not sort that voter's utilities"):
        Profile(("x", "y"), np.array([[0, 1]]), np.array([1.0]), np.array([[0.2, 0.8]]))


def test_a_profile_keeps_read_only_copies_of_its_arrays():
    weights = np.array([1.0, 2.0])
    profile = Profile.from_rankings([[0, 1], [1, 0]], weights)
    weights[0] = 100.0
    assert profile.weights.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError):
        profile.rankings[0, 0] = 1
