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

With a rater-aware head the voters are simulated (`electorate`): a diagonal Gaussian mixture,
its size chosen by BIC, is fitted to the raters' tastes, voters are drawn from it, and each
ranks the candidate images by its own utility r(x, z). A `MeanHead` fitted to the resulting
social order (`social_head`) is the social reward model, saved and loaded like any head
(`vote`; the `reward-models social` command runs it all):

    vote = social_vote(run.rater, run.rater.rater_tastes(), features, names, "borda",
                       ElectorateConfig(n_voters=1000, seed=0))           # features [C, D]
    head = fit_social_head(features, vote.ranking)
    save_social_vote(vote, head, "runs/social/borda")     # ranking.json + head/ (load_head)
"""

from reward_models.social_choice.electorate import (
    Electorate,
    ElectorateConfig,
    TasteDensity,
    fit_taste_density,
    simulate_electorate,
)
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
from reward_models.social_choice.social_head import fit_social_head, social_pairs
from reward_models.social_choice.vote import (
    SocialVote,
    check_rule,
    save_social_vote,
    social_vote,
)

__all__ = [
    "KEMENY_MAX_CANDIDATES",
    "NEEDS_UTILITIES",
    "RULES",
    "Electorate",
    "ElectorateConfig",
    "Profile",
    "SocialRanking",
    "SocialVote",
    "TasteDensity",
    "aggregate",
    "beats",
    "borda",
    "check_rule",
    "condorcet_winner",
    "copeland",
    "egalitarian",
    "fit_social_head",
    "fit_taste_density",
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
    "save_social_vote",
    "simulate_electorate",
    "social_pairs",
    "social_vote",
    "utilitarian",
]
