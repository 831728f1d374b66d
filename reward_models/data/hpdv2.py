"""HPDv2 (Human Preference Dataset v2) as released: train.json choices, test.json rankings.

    HPD/train.json  [{user_hash, prompt, file_path: [n paths], human_preference: [n, one 1]}, ...]
    HPD/test.json   [{prompt, image_path: [n paths], rank: [n numbers, lower preferred],
                      raw_annotations: [{user_hash, rank}, ...] (one ranking per annotator)}, ...]
    HPD/train/, HPD/test/   the images

A choice record of n images gives the n-1 pairs "preferred vs each other image". A ranking gives
all n(n-1)/2 pairs, the lower rank preferred and an equal rank a tie (winner 'tie'). Each
annotator's raw ranking is that rater's; a record's own `rank` (the annotators' average, no one
rater's choice) is used only when the record has no raw annotations but names its user_hash.
`image_path` may stand for `file_path` in either file.

Image paths in the released train.json are relative to train/ ("00001.jpg"); other copies list
them relative to the JSON's own folder ("train/00001.jpg"). Both folders are tried, the one that
holds the listed images is used and logged, and it is the pairs table's `image_root`.

Row reasons, next to those in `validate.py`: 'bad_preference', 'bad_ranking'.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from reward_models.data.tables import RatingData
from reward_models.data.validate import (
    CheckImages,
    OnError,
    RowChecker,
    announce,
    build_pair_table,
)
from reward_models.errors import UserError
from reward_models.io import read_json

logger = logging.getLogger(__name__)

PATH_KEYS = ("file_path", "image_path")
RAW_KEYS = ("raw_annotations", "raw_annotation")  # the README and the file spell it both ways
JSON_NAMES = ("train.json", "test.json")
_FIELDS = ["image_a", "image_b", "rater_id", "winner", "prompt", "source_row", "problem"]
_ROOT_SAMPLE = 32  # image paths tried under each candidate folder


def load_hpdv2(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    check_images: CheckImages = "exists",
    on_error: OnError = "raise",
    known_raters: Iterable[str] | None = None,
) -> RatingData:
    """HPDv2 choices or rankings as pairs; `path` is train.json, test.json or their folder."""
    json_path = find_json(Path(path))
    records = read_json(json_path)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(
            f"{json_path}: expected a JSON list of records (HPDv2 train.json or test.json)"
        )
    path_key = next((k for k in PATH_KEYS if any(k in r for r in records)), PATH_KEYS[0])
    ranking = _is_ranking_file(records)
    _require_fields(records, json_path, path_key, ranking)
    to_rows = _ranking_rows if ranking else _choice_rows
    rows = [row for n, rec in enumerate(records, 1) for row in to_rows(rec, n, path_key)]
    df = pd.DataFrame(rows, columns=_FIELDS)
    df["source"] = pd.Categorical([str(json_path)] * len(df))
    pre = _flag_problems(df, df.pop("problem").tolist(), on_error)
    kept = pre.kept()
    root = Path(image_root) if image_root is not None else image_folder(json_path, kept)
    table, report = build_pair_table(
        kept, root, check_images=check_images, on_error=on_error, known_raters=known_raters
    )
    report = pre.report().followed_by(report)
    announce(json_path, report)
    return RatingData(pairs=table, report=report)


def find_json(path: Path) -> Path:
    """`path` itself if it is a file, else train.json (or failing that test.json) inside it."""
    if path.is_file():
        return path
    found = next((path / n for n in JSON_NAMES if (path / n).is_file()), None)
    if found is None:
        raise UserError(f"{path}: no {' or '.join(JSON_NAMES)} here; pass the file's path")
    return found


def image_folder(json_path: Path, pairs: pd.DataFrame) -> Path:
    """The folder the record paths are relative to: train/ beside train.json, or train.json's own
    folder, whichever holds more of the listed images (train/ when neither holds any)."""
    names = pd.unique(pairs[["image_a", "image_b"]].to_numpy().ravel())
    sample = [n for n in names if isinstance(n, str)][:_ROOT_SAMPLE]
    beside, own = json_path.parent / json_path.stem, json_path.parent
    found = {root: sum((root / n).is_file() for n in sample) for root in (beside, own)}
    use_own = found[own] > found[beside] or (found[own] == 0 and not beside.is_dir())
    root = own if use_own else beside
    example = f" (e.g. {sample[0]!r})" if sample else ""
    logger.info(
        "%s: image paths%s are relative to %s, which holds %d of %d sampled",
        json_path,
        example,
        root,
        found[root],
        len(sample),
    )
    return root


def _is_ranking_file(records: list[dict]) -> bool:
    """test.json layout: rankings and no human_preference anywhere."""
    has = {k for r in records for k in r}
    return "human_preference" not in has and bool(has & {"rank", *RAW_KEYS})


def _require_fields(records: list[dict], json_path: Path, path_key: str, ranking: bool) -> None:
    required = [path_key] if ranking else ["user_hash", path_key, "human_preference"]
    absent = [k for k in required if not any(k in r for r in records)]
    if absent:
        found = ", ".join(records[0]) if records else "(no records)"
        raise UserError(
            f"{json_path}: missing field(s) {', '.join(absent)} for HPDv2; record 1 has: {found} "
            f"(train.json: user_hash, file_path, human_preference; test.json: image_path, rank)"
        )


def _bad(base: dict, reason: str, message: str) -> dict:
    return {**base, "image_a": None, "image_b": None, "winner": None, "problem": (reason, message)}


def _pair(paths: list, i: int, j: int, winner: str) -> dict:
    return {"image_a": paths[i], "image_b": paths[j], "winner": winner, "problem": None}


def _choice_rows(rec: dict, n: int, path_key: str) -> list[dict]:
    """train.json: the preferred image against each other image of the record."""
    paths, pref = rec.get(path_key), rec.get("human_preference")
    base = {"rater_id": rec.get("user_hash"), "prompt": rec.get("prompt"), "source_row": n}
    if base["rater_id"] is None:
        return [_bad(base, "missing_value", "no user_hash; every record needs its annotator")]
    best = _preferred_index(paths, pref)
    if best is None:
        message = f"{path_key} and human_preference must be equal-length lists with exactly one 1"
        return [_bad(base, "bad_preference", message)]
    return [
        {**base, **_pair(paths, min(best, j), max(best, j), "a" if best < j else "b")}
        for j in range(len(paths))
        if j != best
    ]


def _preferred_index(paths, pref) -> int | None:
    if not (isinstance(paths, list) and isinstance(pref, list)):
        return None
    if len(paths) < 2 or len(paths) != len(pref) or sorted(pref) != [0] * (len(pref) - 1) + [1]:
        return None
    return pref.index(1)


def _ranking_rows(rec: dict, n: int, path_key: str) -> list[dict]:
    """test.json: every two images of the record, for each annotator's ranking."""
    paths = rec.get(path_key)
    base = {"rater_id": None, "prompt": rec.get("prompt"), "source_row": n}
    rankings = _rankings(rec)
    if not rankings:
        message = "no raw_annotations and no user_hash; a per-rater pair needs its annotator"
        return [_bad(base, "missing_value", message)]
    rows = []
    for user, rank in rankings:
        if user is None:
            return [_bad(base, "missing_value", "a raw annotation without user_hash")]
        if not _is_ranking(paths, rank):
            message = (
                f"{path_key} and rank must be equal-length lists (2 or more) of paths and numbers"
            )
            return [_bad(base, "bad_ranking", message)]
        for i, j in combinations(range(len(paths)), 2):
            winner = "a" if rank[i] < rank[j] else "b" if rank[j] < rank[i] else "tie"
            rows.append({**base, "rater_id": user, **_pair(paths, i, j, winner)})
    return rows


def _rankings(rec: dict) -> list[tuple]:
    """(user_hash, rank) of each annotator, or the record's own when it names one user."""
    raw = next((rec[k] for k in RAW_KEYS if k in rec), None)
    if isinstance(raw, list) and raw:
        return [
            (a.get("user_hash"), a.get("rank")) if isinstance(a, dict) else (None, None)
            for a in raw
        ]
    if rec.get("user_hash") is not None:
        return [(rec["user_hash"], rec.get("rank"))]
    return []


def _is_ranking(paths, rank) -> bool:
    if not (isinstance(paths, list) and isinstance(rank, list)):
        return False
    numbers = all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rank)
    return len(paths) >= 2 and len(paths) == len(rank) and numbers


def _flag_problems(df: pd.DataFrame, problems: list, on_error: OnError) -> RowChecker:
    """A checker over `df` with each record's (reason, message) problem flagged, file order."""
    pre = RowChecker(df, on_error)
    reasons = np.array([p[0] if p else "" for p in problems], dtype=object)
    for reason in dict.fromkeys(r for r in reasons if r):
        pre.flag(reasons == reason, reason, lambda i: problems[i][1])
    return pre
