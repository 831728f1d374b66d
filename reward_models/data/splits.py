"""Deterministic train/test splits by rater or by image, few-shot context, and rater checks.

- `split_by_rater`: whole raters are held out, for few-shot tests of new users.
- `split_by_image`: images are held out and every rater keeps training data, for tests of
  generalisation to unseen images by known raters.
- `few_shot`: k of one rater's ratings as context (what a new user gives), the rest as target.

All draw from `numpy.random.default_rng(seed)` over sorted ids, so the same data and seed give
the same split on any machine.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from typing import TypeVar

import numpy as np

from reward_models.data.tables import LoadReport, PairTable, RatingData, ScoreTable, _RatingTable
from reward_models.data.validate import OnError, RowChecker, _check_raters, announce
from reward_models.errors import UserError

T = TypeVar("T", ScoreTable, PairTable)


def _n_test(n: int, frac_test: float, what: str) -> int:
    if not 0.0 < frac_test < 1.0:
        raise UserError(f"frac_test must be between 0 and 1 (exclusive), got {frac_test}")
    if n < 2:
        raise UserError(f"cannot split {n} {what}; a split needs at least 2")
    return min(n - 1, max(1, round(frac_test * n)))


def _partition(data: RatingData, in_test) -> tuple[RatingData, RatingData]:
    """Split each table of `data` by the row mask `in_test(table)`."""
    train, test = RatingData(), RatingData()
    for name in ("scores", "pairs"):
        table = getattr(data, name)
        if table is None:
            continue
        mask = in_test(table)
        setattr(train, name, table.select(~mask))
        setattr(test, name, table.select(mask))
    return train, test


def split_by_rater(data: RatingData, frac_test: float, seed: int) -> tuple[RatingData, RatingData]:
    """(train, test) with round(frac_test * n_raters) raters' rows (at least 1) only in test."""
    raters = np.array(data.rater_ids, dtype=object)
    n_test = _n_test(len(raters), frac_test, "raters")
    rng = np.random.default_rng(seed)
    test_raters = set(raters[rng.permutation(len(raters))[:n_test]])
    return _partition(data, lambda t: t.df["rater_id"].isin(test_raters).to_numpy())


def split_by_image(data: RatingData, frac_test: float, seed: int) -> tuple[RatingData, RatingData]:
    """(train, test) with held-out images, and every rater keeping at least one training row.

    Images are visited in a seeded random order and held out while the target count
    (round(frac_test * n_images)) is not reached and holding one out leaves each of its raters a
    training row. A pair whose two images fall on different sides is in neither part (it would
    leak a test image into training); their number is given in a warning.
    """
    images = data.images
    n_test = _n_test(len(images), frac_test, "images")
    tables = data.tables()
    # For each image, the (table, row) positions that mention it.
    touches: dict[str, list[tuple[int, np.ndarray]]] = {}
    for t, table in enumerate(tables):
        columns = ["image"] if isinstance(table, ScoreTable) else ["image_a", "image_b"]
        for col in columns:
            for image, rows in table.df.groupby(col, sort=False).indices.items():
                touches.setdefault(image, []).append((t, rows))
    raters = [table.df["rater_id"].to_numpy() for table in tables]
    alive = [np.ones(len(table), dtype=bool) for table in tables]
    train_rows = Counter(r for ids in raters for r in ids)

    held_out: set[str] = set()
    for k in np.random.default_rng(seed).permutation(len(images)):
        if len(held_out) == n_test:
            break
        image = images[k]
        lost = [(t, rows[alive[t][rows]]) for t, rows in touches.get(image, [])]
        need = Counter(r for t, rows in lost for r in raters[t][rows])
        if all(train_rows[r] > n for r, n in need.items()):
            held_out.add(image)
            train_rows.subtract(need)
            for t, rows in lost:
                alive[t][rows] = False
    if len(held_out) < n_test:
        warnings.warn(
            f"split_by_image: held out {len(held_out)} of the {n_test} images asked for; more "
            f"would leave some rater without training data",
            stacklevel=2,
        )

    def side(table: _RatingTable, column: str) -> np.ndarray:
        return table.df[column].isin(held_out).to_numpy()

    train, test = RatingData(), RatingData()
    if data.scores is not None:
        mask = side(data.scores, "image")
        train.scores, test.scores = data.scores.select(~mask), data.scores.select(mask)
    if data.pairs is not None:
        a, b = side(data.pairs, "image_a"), side(data.pairs, "image_b")
        train.pairs, test.pairs = data.pairs.select(~a & ~b), data.pairs.select(a & b)
        if (straddle := int((a != b).sum())) > 0:
            warnings.warn(
                f"split_by_image: {straddle} of {len(a)} pairs have one image on each side and "
                f"are in neither part",
                stacklevel=2,
            )
    return train, test


def few_shot(table: T, rater: str, k: int, seed: int) -> tuple[T, T]:
    """(context, target): k of `rater`'s rows drawn at random, and the rest, both in table order."""
    rows = table.rows_of(str(rater))
    if len(rows) == 0:
        some = ", ".join(table.rater_ids[:5])
        raise UserError(f"rater {rater!r} has no ratings in this table (raters include: {some})")
    if not 0 <= k < len(rows):
        raise UserError(
            f"k={k} but rater {rater!r} has {len(rows)} ratings; k must be 0..{len(rows) - 1} "
            f"so that at least one remains as target"
        )
    order = np.random.default_rng(seed).permutation(rows)
    return table.select(np.sort(order[:k])), table.select(np.sort(order[k:]))


def check_known_raters(
    table: T, known_raters: Iterable[str], on_error: OnError = "raise"
) -> tuple[T, LoadReport]:
    """Rows of raters in `known_raters` (e.g. an evaluation split's against the trained raters).

    An unknown rater is a UserError naming the file and line, or with on_error='skip' a row
    dropped and counted as 'unknown_rater'.
    """
    checker = RowChecker(table.df, on_error)
    _check_raters(checker, known_raters)
    report = checker.report()
    announce(str(table.df["source"].iat[0]) if len(table) else "(empty table)", report)
    return table.select(~checker.bad), report
