"""Explicit social choice: aggregate many voters' rankings (or utilities) into one ranking.

A standard reward model is an implicit vote: with complete pairwise data its Bradley-Terry loss
converges to the Borda count, with incomplete data not even that. This package makes the vote
explicit, so the rule is a choice a reader can see and change.

    profile = Profile.from_rankings(ballots, weights=shares, candidates=names)
    profile = Profile.from_utilities(utilities, weights=shares)        # utilities [V, C]
    result = aggregate(profile, "copeland")                            # any key of RULES
    result.order, result.scores, result.winner_name
    pairwise_margins(profile), condorcet_winner(profile)

Rules (RULES): random_ballot, plurality, borda, copeland, maximin, kemeny, instant_runoff (read
rankings); utilitarian, egalitarian, nash (need utilities; NEEDS_UTILITIES). Ties go to the
lower candidate index; see `rules` for the exact statement.
"""

from reward_models.social_choice.pairwise import (
    beats,
    condorcet_winner,
    pairwise_margins,
    pairwise_support,
)
from reward_models.social_choice.profile import Profile, rank_utilities
from reward_models.social_choice.rules import (
    KEMENY_MAX_CANDIDATES,
    NEEDS_UTILITIES,
    RULES,
    SocialRanking,
    aggregate,
    borda,
    copeland,
    egalitarian,
    instant_runoff,
    kemeny,
    maximin,
    nash,
    order_by_scores,
    plurality,
    random_ballot,
    utilitarian,
)

__all__ = [
    "KEMENY_MAX_CANDIDATES",
    "NEEDS_UTILITIES",
    "RULES",
    "Profile",
    "SocialRanking",
    "aggregate",
    "beats",
    "borda",
    "condorcet_winner",
    "copeland",
    "egalitarian",
    "instant_runoff",
    "kemeny",
    "maximin",
    "nash",
    "order_by_scores",
    "pairwise_margins",
    "pairwise_support",
    "plurality",
    "random_ballot",
    "rank_utilities",
    "utilitarian",
]
