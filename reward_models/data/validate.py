"""Reading rating files and turning raw rows into checked `ScoreTable`s and `PairTable`s.

Every problem a user can cause is a `UserError` naming the file and the line/row, what is wrong
and how to fix it. With `on_error="skip"` bad rows are dropped instead, counted per reason in the
`LoadReport` and announced in one warning; a load never drops rows silently. A row with several
problems is counted once, under the first reason checked. Reasons:

    missing_value       an empty image or rater id
    nan_score           a score that is empty or not a number
    score_out_of_range  a score outside `score_range`
    bad_winner          a pair's winner that is not 'a'/'b'/'tie' (or 0/1/0.5)
    same_image          a pair naming the same image on both sides
    missing_image       an image file that does not exist under the image root
    unreadable_image    an image PIL cannot decode (checked with check_images="decode")
    unknown_rater       a rater absent from `known_raters` (an evaluation split's raters)
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image

from reward_models.data.tables import (
    PAIR_COLUMNS,
    SCORE_COLUMNS,
    LoadReport,
    PairTable,
    ScoreTable,
    where,
)
from reward_models.errors import UserError

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
CheckImages = Literal["none", "exists", "decode"]
TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")


def read_table(
    path: str | Path, str_columns: Iterable[str] = (), literal_columns: Iterable[str] = ()
) -> pd.DataFrame:
    """A CSV, JSONL or Parquet file (by suffix) as a DataFrame with `source`/`source_row` added.

    Column names are stripped of surrounding spaces (some released CSVs have ' worker, score').
    `str_columns` are read as text so ids like '007' keep their zeros. In a CSV's
    `literal_columns` only an empty field is missing: a written 'NaN' or 'NA' stays that text, so
    a check can quote what the file says instead of calling it empty.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise UserError(f"{path}: unsupported table type '{suffix}'; use .csv, .jsonl or .parquet")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        if suffix == ".csv":
            # skipinitialspace also strips the header's ' worker, imagePair' style names.
            dtype = {c: str for c in str_columns}
            df = pd.read_csv(path, skipinitialspace=True, dtype=dtype)
            _restore_literal_text(df, path, literal_columns)
            rows = np.arange(len(df)) + 2  # line numbers; the header is line 1
        elif suffix == ".jsonl":
            df, rows = _read_jsonl(path)
        else:
            df = pd.read_parquet(path)
            rows = np.arange(len(df)) + 1
    except UserError:
        raise
    except (OSError, ValueError, pd.errors.ParserError) as e:  # pandas/pyarrow parse errors
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"{path}: not a readable {suffix[1:]} table ({detail})") from None
    df.columns = [str(c).strip() for c in df.columns]
    df = df.reset_index(drop=True)
    df["source"] = pd.Categorical([str(path)] * len(df))
    df["source_row"] = rows
    return df


def _restore_literal_text(df: pd.DataFrame, path: Path, columns: Iterable[str]) -> None:
    """Put back the text pandas read as missing ('NaN', 'NA', 'null') in `columns`, in place.

    Only a column with missing values is read a second time, so a clean file costs nothing more.
    """
    for col in columns:
        raw_name = next((c for c in df.columns if str(c).strip() == col), None)
        if raw_name is None or not df[raw_name].isna().any():
            continue
        text = pd.read_csv(
            path, skipinitialspace=True, usecols=[raw_name], dtype=str, keep_default_na=False
        )[raw_name].to_numpy(dtype=object)
        values = df[raw_name].to_numpy(dtype=object)
        written = df[raw_name].isna().to_numpy() & (text != "")
        values[written] = text[written]
        df[raw_name] = pd.Series(values, index=df.index, dtype=object)


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    records, lines = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {lineno}: expected a JSON object per line")
            records.append(record)
            lines.append(lineno)
    return pd.DataFrame.from_records(records), np.asarray(lines, dtype=np.int64)


def require_columns(df: pd.DataFrame, required: Iterable[str], source: str, kind: str) -> None:
    """Raise a UserError naming the missing columns and the columns found."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        found = [c for c in df.columns if c not in ("source", "source_row")]
        raise UserError(
            f"{source}: missing column(s) {', '.join(missing)} for a {kind} table; "
            f"found columns: {', '.join(found) or '(none)'}"
        )


def as_id_strings(values: pd.Series) -> pd.Series:
    """Ids as stripped strings (7 and 7.0 -> '7'); empty or missing -> None."""

    def one(v):
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        s = str(v).strip()
        return s or None

    # A list, not Series.map: map on a string column turns None back into NaN.
    return pd.Series([one(v) for v in values], index=values.index, dtype=object)


class RowChecker:
    """Collects row problems: raises on the first under on_error='raise', else counts per reason."""

    def __init__(self, df: pd.DataFrame, on_error: OnError):
        check_options("none", on_error)
        self.df = df
        self.on_error = on_error
        self.bad = np.zeros(len(df), dtype=bool)
        self.skipped: dict[str, int] = {}

    def flag(self, mask, reason: str, describe: Callable[[int], str]) -> None:
        """Mark rows where `mask` holds; `describe(i)` says what is wrong with row i and the fix."""
        mask = np.asarray(mask, dtype=bool) & ~self.bad
        if not mask.any():
            return
        if self.on_error == "raise":
            i = int(np.flatnonzero(mask)[0])
            loc = where(str(self.df["source"].iat[i]), int(self.df["source_row"].iat[i]))
            raise UserError(f"{loc}: {describe(i)} (or pass on_error='skip' to drop such rows)")
        self.bad |= mask
        self.skipped[reason] = self.skipped.get(reason, 0) + int(mask.sum())

    def report(self) -> LoadReport:
        kept = int((~self.bad).sum())
        return LoadReport(rows_read=len(self.bad), rows_kept=kept, skipped=dict(self.skipped))

    def kept(self) -> pd.DataFrame:
        return self.df[~self.bad].reset_index(drop=True)


def announce(source: str | Path, report: LoadReport) -> None:
    """Warn (and log) once per load when rows were skipped, with the count for each reason."""
    if not report.skipped:
        return
    counts = ", ".join(f"{n} {reason}" for reason, n in sorted(report.skipped.items()))
    dropped = report.rows_read - report.rows_kept
    msg = f"{source}: skipped {dropped} of {report.rows_read} rows ({counts})"
    logger.warning(msg)
    warnings.warn(msg, stacklevel=3)


def check_options(check_images: str, on_error: str) -> None:
    """Raise a UserError for a check_images or on_error value that is not one of the choices."""
    if check_images not in ("none", "exists", "decode"):
        raise UserError(f"check_images must be 'none', 'exists' or 'decode', got {check_images!r}")
    if on_error not in ("raise", "skip"):
        raise UserError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def image_status(root: Path, names: Iterable[str], check_images: CheckImages) -> dict[str, str]:
    """'ok', 'missing' or 'unreadable' for each distinct image name under `root`."""
    check_options(check_images, "raise")
    status = {}
    for name in set(names):
        path = root / name
        if check_images == "none":
            status[name] = "ok"
        elif not path.is_file():
            status[name] = "missing"
        elif check_images == "decode" and not _decodes(path):
            status[name] = "unreadable"
        else:
            status[name] = "ok"
    return status


def _decodes(path_or_file) -> bool:
    try:
        with Image.open(path_or_file) as im:
            im.load()
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def _check_images(
    checker: RowChecker, columns: list[str], root: Path, check_images: CheckImages
) -> None:
    df = checker.df
    names = [df[c].to_numpy()[~checker.bad] for c in columns]
    status = image_status(root, np.concatenate(names) if names else [], check_images)
    for wanted, reason, what in (
        ("missing", "missing_image", "image file not found"),
        ("unreadable", "unreadable_image", "image file cannot be decoded"),
    ):
        for col in columns:
            values = df[col].to_numpy()
            mask = (df[col].map(status) == wanted).to_numpy(dtype=bool)
            checker.flag(
                mask,
                reason,
                lambda i, col=col, values=values, what=what: (
                    f"{what}: {root / values[i]} (column {col}); check the file or pass "
                    f"image_root= the folder the image paths are relative to"
                ),
            )


def _check_raters(checker: RowChecker, known_raters: Iterable[str] | None) -> None:
    if known_raters is None:
        return
    known = {str(r) for r in known_raters}
    ids = checker.df["rater_id"].to_numpy()
    unknown = checker.df["rater_id"].notna() & ~checker.df["rater_id"].isin(known)
    checker.flag(
        unknown.to_numpy(dtype=bool),
        "unknown_rater",
        lambda i: f"rater '{ids[i]}' is not one of the {len(known)} known raters of this split",
    )


def _check_present(checker: RowChecker, columns: list[str]) -> None:
    for col in columns:
        checker.flag(
            checker.df[col].isna().to_numpy(dtype=bool),
            "missing_value",
            lambda i, col=col: f"empty {col}; every row needs one",
        )


def build_score_table(
    df: pd.DataFrame,
    image_root: str | Path,
    *,
    score_range: tuple[float, float] = (0.0, 10.0),
    check_images: CheckImages = "exists",
    on_error: OnError = "raise",
    known_raters: Iterable[str] | None = None,
    meta_columns: Iterable[str] = (),
) -> tuple[ScoreTable, LoadReport]:
    """Check a DataFrame with columns image, rater_id, score (+ provenance) and wrap it.

    `score_range` is inclusive, in the dataset's units. Returns the table of kept rows and the
    report (see the module docstring for the reasons).
    """
    check_options(check_images, on_error)
    image_root = Path(image_root)
    if len(score_range) != 2 or not float(score_range[0]) <= float(score_range[1]):
        raise UserError(f"score_range must be (low, high) with low <= high, got {score_range!r}")
    lo, hi = float(score_range[0]), float(score_range[1])
    df = _with_provenance(df)
    source = _source_name(df)
    require_columns(df, SCORE_COLUMNS, source, "scores")
    df["image"] = as_id_strings(df["image"])
    df["rater_id"] = as_id_strings(df["rater_id"])
    raw_score = df["score"].to_numpy()
    df["score"] = pd.to_numeric(df["score"], errors="coerce").astype(np.float64)
    score = df["score"].to_numpy()

    checker = RowChecker(df, on_error)
    _check_present(checker, ["image", "rater_id"])
    checker.flag(
        np.isnan(score),
        "nan_score",
        lambda i: (
            "score is empty; fill it in or remove the row"
            if pd.isna(raw_score[i])
            else f"score {str(raw_score[i])!r} is not a number; fix it or remove the row"
        ),
    )
    with np.errstate(invalid="ignore"):
        out = (score < lo) | (score > hi)
    checker.flag(
        out,
        "score_out_of_range",
        lambda i: (
            f"score {score[i]:g} is outside [{lo:g}, {hi:g}]; fix it or pass "
            f"score_range=(low, high) for this dataset's scale"
        ),
    )
    _check_raters(checker, known_raters)
    _check_images(checker, ["image"], image_root, check_images)
    report = checker.report()
    return ScoreTable(checker.kept(), image_root, _present(df, meta_columns)), report


def build_pair_table(
    df: pd.DataFrame,
    image_root: str | Path,
    *,
    check_images: CheckImages = "exists",
    on_error: OnError = "raise",
    known_raters: Iterable[str] | None = None,
    meta_columns: Iterable[str] = (),
) -> tuple[PairTable, LoadReport]:
    """Check a DataFrame with columns image_a, image_b, rater_id, winner and wrap it.

    winner may be 'a'/'b'/'tie' (any case) or 0/1/0.5, read as the probability that image_b was
    preferred (0: image_a, 1: image_b, 0.5: neither); it is stored as 'a'/'b'/'tie'.
    """
    check_options(check_images, on_error)
    image_root = Path(image_root)
    df = _with_provenance(df)
    source = _source_name(df)
    require_columns(df, PAIR_COLUMNS, source, "pairs")
    for col in ("image_a", "image_b", "rater_id"):
        df[col] = as_id_strings(df[col])
    raw_winner = df["winner"].to_numpy()
    df["winner"] = [_winner(v) for v in raw_winner]

    checker = RowChecker(df, on_error)
    _check_present(checker, ["image_a", "image_b", "rater_id"])
    checker.flag(
        df["winner"].isna().to_numpy(),
        "bad_winner",
        lambda i: (
            f"winner {raw_winner[i]!r} is not 'a' or 'b' (or 0/1 for image_a/image_b), "
            f"nor 'tie' (or 0.5) for a pair where neither image was preferred"
        ),
    )
    a, b = df["image_a"].to_numpy(), df["image_b"].to_numpy()
    checker.flag(
        a == b,
        "same_image",
        lambda i: f"the pair names the same image twice ({a[i]}); a choice needs two images",
    )
    _check_raters(checker, known_raters)
    _check_images(checker, ["image_a", "image_b"], image_root, check_images)
    report = checker.report()
    return PairTable(checker.kept(), image_root, _present(df, meta_columns)), report


_WINNERS = {"a": "a", "b": "b", "tie": "tie", "0": "a", "1": "b", "0.5": "tie"}


def _winner(v) -> str | None:
    if isinstance(v, str):
        return _WINNERS.get(v.strip().lower())
    if isinstance(v, (bool, np.bool_)):
        return None  # True/False says nothing about which side
    if isinstance(v, (int, float, np.integer, np.floating)) and v in (0, 1, 0.5):
        return {0: "a", 1: "b", 0.5: "tie"}[v]
    return None


def _with_provenance(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with `source`/`source_row`, added for tables built in memory (row = position)."""
    df = df.reset_index(drop=True)
    if "source" not in df.columns:
        df["source"] = pd.Categorical(["(in-memory table)"] * len(df))
    if "source_row" not in df.columns:
        df["source_row"] = np.arange(1, len(df) + 1)
    return df


def _source_name(df: pd.DataFrame) -> str:
    sources = df["source"].astype(str).unique().tolist()
    return sources[0] if len(sources) == 1 else ", ".join(sources[:3]) or "(empty table)"


def _present(df: pd.DataFrame, columns: Iterable[str]) -> tuple[str, ...]:
    return tuple(c for c in columns if c in df.columns)
