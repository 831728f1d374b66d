"""Rating tables, dataset adapters, validation and splits: the first stage of reward modelling.

Typical use:

    from reward_models.data import load_ratings, split_by_rater, few_shot

    data = load_ratings("PARA/")                       # RatingData(scores=ScoreTable, pairs=None)
    train, test = split_by_rater(data, frac_test=0.2, seed=0)
    context, target = few_shot(test.scores, test.rater_ids[0], k=10, seed=0)

Modules: `tables` (the containers), `validate` (reading and checks), `adapters` (published
datasets; `hpdv2` for HPDv2), `load` (`load_ratings`), `splits`, `summary` (what a load read).
"""

from reward_models.data.adapters import load_flickr_aes, load_lapis, load_para, load_pickapic
from reward_models.data.hpdv2 import load_hpdv2
from reward_models.data.load import FORMATS, detect_format, load_pairs, load_ratings, load_scores
from reward_models.data.splits import check_known_raters, few_shot, split_by_image, split_by_rater
from reward_models.data.tables import LoadReport, PairTable, RatingData, ScoreTable
from reward_models.data.validate import build_pair_table, build_score_table, read_table

__all__ = [
    "FORMATS",
    "LoadReport",
    "PairTable",
    "RatingData",
    "ScoreTable",
    "build_pair_table",
    "build_score_table",
    "check_known_raters",
    "detect_format",
    "few_shot",
    "load_flickr_aes",
    "load_hpdv2",
    "load_lapis",
    "load_pairs",
    "load_para",
    "load_pickapic",
    "load_ratings",
    "load_scores",
    "read_table",
    "split_by_image",
    "split_by_rater",
]
