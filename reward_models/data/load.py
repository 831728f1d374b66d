"""`load_ratings`: one entry point for our own tables and every adapted dataset.

    data = load_ratings("runs/toy-world")                 # scores.csv + pairs.csv in a folder
    data = load_ratings("PARA/", image_root="/big/PARA/imgs")
    data = load_ratings("ratings.jsonl", format="scores", score_range=(1, 7), on_error="skip")
    data.scores, data.pairs, data.report.skipped          # ScoreTable | None, PairTable | None

With format="auto" the layout is told by file name (PARA-Images.csv, FLICKR-AES_..._worker.csv,
LAPIS_individualratings_metaANDdemodata.csv, *.json -> HPDv2), by the Parquet schema (jpg_0 ->
Pick-a-Pic), and for our own tables by their columns (image_a/image_b -> pairs, score -> scores).
A folder is searched for those files, then for scores.* and pairs.* (both are loaded).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from reward_models.data import adapters, hpdv2
from reward_models.data.tables import PAIR_COLUMNS, SCORE_COLUMNS, RatingData
from reward_models.data.validate import (
    TABLE_SUFFIXES,
    CheckImages,
    OnError,
    announce,
    as_id_strings,
    build_pair_table,
    check_options,
    read_table,
    require_columns,
)
from reward_models.errors import UserError

FORMATS = ("auto", "scores", "pairs", "para", "flickr_aes", "lapis", "pickapic", "hpdv2")
_NAMED_FILES = {
    adapters.PARA_IMAGES: "para",
    adapters.FLICKR_AES: "flickr_aes",
    adapters.LAPIS: "lapis",
}
_ALIASES = {"flickr": "flickr_aes", "pick_a_pic": "pickapic", "hpd": "hpdv2", "hpd_v2": "hpdv2"}


def load_scores(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    score_range: tuple[float, float] = (0.0, 10.0),
    check_images: CheckImages = "exists",
    on_error: OnError = "raise",
    known_raters: Iterable[str] | None = None,
    rater_info: str | Path | None = None,
) -> RatingData:
    """A scores table (image, rater_id, score); images relative to `image_root` (default: the
    table's folder). `rater_info` names a table with rater_id + metadata columns to join."""
    path = Path(path)
    df = read_table(path, str_columns=SCORE_COLUMNS[:2], literal_columns=("score",))
    meta: tuple[str, ...] = ()
    if rater_info is not None:
        require_columns(df, SCORE_COLUMNS, str(path), "scores")
        df["rater_id"] = as_id_strings(df["rater_id"])
        df, meta = adapters.join_rater_info(df, Path(rater_info), key="rater_id")
    root = Path(image_root) if image_root is not None else path.parent
    return adapters.score_data(
        df,
        root,
        path,
        score_range=score_range,
        check_images=check_images,
        on_error=on_error,
        known_raters=known_raters,
        meta_columns=meta,
    )


def load_pairs(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    check_images: CheckImages = "exists",
    on_error: OnError = "raise",
    known_raters: Iterable[str] | None = None,
    rater_info: str | Path | None = None,
) -> RatingData:
    """A pairs table (image_a, image_b, rater_id, winner); see `load_scores` for the rest."""
    path = Path(path)
    df = read_table(path, str_columns=PAIR_COLUMNS[:3])
    meta: tuple[str, ...] = ()
    if rater_info is not None:
        require_columns(df, PAIR_COLUMNS, str(path), "pairs")
        df["rater_id"] = as_id_strings(df["rater_id"])
        df, meta = adapters.join_rater_info(df, Path(rater_info), key="rater_id")
    root = Path(image_root) if image_root is not None else path.parent
    table, report = build_pair_table(
        df,
        root,
        check_images=check_images,
        on_error=on_error,
        known_raters=known_raters,
        meta_columns=meta,
    )
    announce(path, report)
    return RatingData(pairs=table, report=report)


def load_ratings(
    path: str | Path,
    format: str = "auto",
    image_root: str | Path | None = None,
    *,
    score_range: tuple[float, float] | None = None,
    check_images: CheckImages = "exists",
    on_error: OnError = "raise",
    known_raters: Iterable[str] | None = None,
    rater_info: str | Path | None = None,
) -> RatingData:
    """Load ratings from a file or folder in any supported layout (see the module docstring).

    score_range: inclusive bounds of a valid score; None takes the layout's own scale ([0, 10]
        for our tables, [1, 5] PARA and FLICKR-AES, [0, 100] LAPIS).
    check_images: 'exists' (default), 'decode' (open every image with PIL) or 'none'.
    on_error: 'raise' on the first bad row, or 'skip' bad rows (counted in `report.skipped`).
    known_raters: the raters an evaluation split may name; any other is an 'unknown_rater' row.
    image_root: the folder image paths are relative to; for Pick-a-Pic, the image cache.
    rater_info: for our own tables, a per-rater table (rater_id + metadata) to join.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    check_options(check_images, on_error)
    fmt = _ALIASES.get(format.lower().replace("-", "_"), format.lower().replace("-", "_"))
    if fmt not in FORMATS:
        raise UserError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt, path = detect_format(path)
    common = {"check_images": check_images, "on_error": on_error, "known_raters": known_raters}
    scale = {} if score_range is None else {"score_range": tuple(score_range)}
    if rater_info is not None and fmt not in ("scores", "pairs", "tables"):
        raise UserError(f"rater_info is for our own scores/pairs tables, not format {fmt!r}")
    if fmt in ("pickapic", "hpdv2") and scale:
        raise UserError(f"score_range does not apply to {fmt}, which holds pairwise choices")

    if fmt == "para":
        return adapters.load_para(path, image_root, **scale, **common)
    if fmt == "flickr_aes":
        return adapters.load_flickr_aes(path, image_root, **scale, **common)
    if fmt == "lapis":
        return adapters.load_lapis(path, image_root, **scale, **common)
    if fmt == "pickapic":
        return adapters.load_pickapic(path, image_root, **common)
    if fmt == "hpdv2":
        return hpdv2.load_hpdv2(path, image_root, **common)

    # Our own tables: a file of one kind, or a folder with scores.* and/or pairs.*.
    found = {fmt: path} if path.is_file() else _own_tables(path, fmt)
    data = RatingData()
    if "scores" in found:
        loaded = load_scores(found["scores"], image_root, **scale, **common, rater_info=rater_info)
        data = RatingData(scores=loaded.scores, report=loaded.report)
    if "pairs" in found:
        if scale and "scores" not in found:
            raise UserError("score_range does not apply to a pairs table")
        loaded = load_pairs(found["pairs"], image_root, **common, rater_info=rater_info)
        data = RatingData(data.scores, loaded.pairs, data.report.merged(loaded.report))
    return data


def detect_format(path: Path) -> tuple[str, Path]:
    """(format, path to load) for a file or folder; a UserError says what was looked for."""
    if path.is_dir():
        for name, fmt in _NAMED_FILES.items():
            for candidate in (path / name, path / "annotation" / name):
                if candidate.is_file():
                    return fmt, candidate
        for name in hpdv2.JSON_NAMES:
            if (path / name).is_file():
                return "hpdv2", path / name
        shards = sorted(path.glob("*.parquet"))
        if shards and "jpg_0" in _columns(shards[0]):
            return "pickapic", path
        if _own_tables(path, "tables", required=False):
            return "tables", path
        raise UserError(
            f"{path}: found no ratings here: looked for {', '.join(_NAMED_FILES)}, "
            f"{', '.join(hpdv2.JSON_NAMES)}, Pick-a-Pic .parquet shards, and scores/pairs "
            f".csv/.jsonl/.parquet; pass a file or format="
        )
    if path.name in _NAMED_FILES:
        return _NAMED_FILES[path.name], path
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "hpdv2", path
    if suffix not in TABLE_SUFFIXES:
        raise UserError(f"{path}: cannot tell the layout of a '{suffix}' file; pass format=")
    columns = _columns(path)
    if suffix == ".parquet" and "jpg_0" in columns:
        return "pickapic", path
    if {"image_a", "image_b"} <= set(columns):
        return "pairs", path
    if "score" in columns:
        return "scores", path
    raise UserError(
        f"{path}: cannot tell scores from pairs; found columns: {', '.join(columns)}; a scores "
        f"table has {', '.join(SCORE_COLUMNS)}, a pairs table {', '.join(PAIR_COLUMNS)}"
    )


def _own_tables(folder: Path, kind: str, required: bool = True) -> dict[str, Path]:
    kinds = ("scores", "pairs") if kind == "tables" else (kind,)
    found = {}
    for k in kinds:
        files = [folder / f"{k}{s}" for s in TABLE_SUFFIXES if (folder / f"{k}{s}").is_file()]
        if len(files) > 1:
            raise UserError(f"{folder}: both {files[0].name} and {files[1].name}; keep one")
        if files:
            found[k] = files[0]
    if required and not found:
        raise UserError(f"{folder}: no {' or '.join(kinds)} table (.csv, .jsonl or .parquet)")
    return found


def _columns(path: Path) -> list[str]:
    """Column names without reading the data."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return list(pq.read_schema(path).names)
        if suffix == ".csv":
            return [str(c).strip() for c in pd.read_csv(path, nrows=0, skipinitialspace=True)]
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "{}")
        return list(json.loads(first))
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise UserError(f"{path}: not a readable table ({type(e).__name__})") from None
