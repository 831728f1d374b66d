"""Typed containers for per-rater ratings: absolute scores and pairwise choices.

Both kinds are pandas DataFrames with fixed column names, an image root the image columns are
relative to, and two provenance columns so that any row can be traced back to where it came from:

    scores: image, rater_id, score                         (+ source, source_row, extra columns)
    pairs:  image_a, image_b, rater_id, winner ("a"|"b"|"tie")  (+ source, source_row, extra columns)

`rater_id` is always a string (ids such as "007" keep their zeros). Extra columns of the input
(a prompt, PARA's sub-scores, rater demographics) are kept; `meta_columns` names those that
describe the rater rather than the rating, so `rater_metadata()` can return one row per rater.

A tie ("tie": the rater saw both images and preferred neither, as in Pick-a-Pic's 0.5/0.5 labels
or equal ranks in HPDv2's test split) is kept: the Bradley-Terry losses take the soft label 0.5
(`PairTable.b_preferred`), which pulls the two images' utilities together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

SCORE_COLUMNS = ("image", "rater_id", "score")
PAIR_COLUMNS = ("image_a", "image_b", "rater_id", "winner")
PROVENANCE_COLUMNS = ("source", "source_row")


def where(source: str, row: int) -> str:
    """Where a row lives, in the words a user looks it up by: CSV/JSONL line, Parquet row, JSON record.

    `row` is what loaders store in `source_row`: the line number for text tables (a CSV's header is
    line 1), the 1-based row for Parquet, the 1-based record for a JSON list.
    """
    suffix = Path(source).suffix.lower()
    kind = {".csv": "line", ".jsonl": "line", ".json": "record"}.get(suffix, "row")
    return f"{source} {kind} {row}"


@dataclass
class LoadReport:
    """What a load kept and what it skipped, with the count for each reason (e.g. 'nan_score')."""

    rows_read: int = 0
    rows_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def merged(self, other: LoadReport) -> LoadReport:
        skipped = dict(self.skipped)
        for reason, n in other.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
        return LoadReport(
            self.rows_read + other.rows_read, self.rows_kept + other.rows_kept, skipped
        )

    def followed_by(self, second: LoadReport) -> LoadReport:
        """The report of two checks in a row: rows read by this one, kept by `second`."""
        return LoadReport(self.rows_read, second.rows_kept, self.merged(second).skipped)


@dataclass(eq=False)  # DataFrames have no single truth value to compare by
class _RatingTable:
    """What score and pair tables share: a DataFrame, its image root and its rater metadata."""

    df: pd.DataFrame
    image_root: Path
    meta_columns: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.df)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} rows, {self.df['rater_id'].nunique()} raters, "
            f"{len(self.images)} images, image_root={str(self.image_root)!r})"
        )

    @property
    def rater_ids(self) -> list[str]:
        """Distinct raters, sorted."""
        return sorted(self.df["rater_id"].unique().tolist())

    def image_path(self, image: str) -> Path:
        """The file of an image named in this table."""
        return self.image_root / image

    def where(self, i: int) -> str:
        """Where row `i` of this table came from, e.g. 'ratings.csv line 7'."""
        return where(str(self.df["source"].iat[i]), int(self.df["source_row"].iat[i]))

    def select(self, rows) -> _RatingTable:
        """A table of the given rows (a boolean mask or integer positions), in that order."""
        rows = np.asarray(rows)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        df = self.df.iloc[rows].reset_index(drop=True)
        return dataclasses.replace(self, df=df)

    def rows_of(self, rater_id: str) -> np.ndarray:
        """Positions of `rater_id`'s rows, [n] int64 ascending."""
        return np.flatnonzero((self.df["rater_id"] == rater_id).to_numpy())

    def rater_metadata(self) -> pd.DataFrame:
        """One row per rater (index `rater_id`, sorted) with the `meta_columns`."""
        cols = list(self.meta_columns)
        return self.df.groupby("rater_id", sort=True)[cols].first()


@dataclass(eq=False, repr=False)
class ScoreTable(_RatingTable):
    """Absolute scores: one row per (image, rater) rating. Units are the dataset's own scale."""

    @property
    def images(self) -> list[str]:
        """Distinct image names (relative to `image_root`), sorted."""
        return sorted(self.df["image"].unique().tolist())

    @property
    def scores(self) -> np.ndarray:
        """[N] float64, in the order of the rows."""
        return self.df["score"].to_numpy(dtype=np.float64)


@dataclass(eq=False, repr=False)
class PairTable(_RatingTable):
    """Pairwise choices: rater `rater_id` preferred `image_a` (winner 'a') or `image_b` ('b'), or
    saw both and preferred neither ('tie')."""

    @property
    def images(self) -> list[str]:
        """Distinct image names over both sides (relative to `image_root`), sorted."""
        both = pd.concat([self.df["image_a"], self.df["image_b"]])
        return sorted(both.unique().tolist())

    @property
    def a_wins(self) -> np.ndarray:
        """[N] bool, True where image_a was preferred."""
        return (self.df["winner"] == "a").to_numpy()

    @property
    def ties(self) -> np.ndarray:
        """[N] bool, True where the rater preferred neither image."""
        return (self.df["winner"] == "tie").to_numpy()

    @property
    def b_preferred(self) -> np.ndarray:
        """[N] float64, the probability that image_b is preferred: 0 ('a'), 1 ('b'), 0.5 ('tie');
        the `winner` target of `reward_models.train.PairSet`."""
        winner = self.df["winner"].to_numpy()
        return np.where(winner == "b", 1.0, np.where(winner == "tie", 0.5, 0.0))


@dataclass(eq=False)
class RatingData:
    """Everything one load produced: scores and/or pairs, and the report of what was skipped."""

    scores: ScoreTable | None = None
    pairs: PairTable | None = None
    report: LoadReport = field(default_factory=LoadReport)

    def tables(self) -> list[_RatingTable]:
        return [t for t in (self.scores, self.pairs) if t is not None]

    @property
    def rater_ids(self) -> list[str]:
        """Distinct raters over scores and pairs, sorted."""
        return sorted({r for t in self.tables() for r in t.rater_ids})

    @property
    def images(self) -> list[str]:
        """Distinct images over scores and pairs, sorted."""
        return sorted({im for t in self.tables() for im in t.images})
