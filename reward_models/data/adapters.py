"""Adapters for published per-rater datasets, each reading the layout exactly as released.

Each returns `RatingData` in the common tables (see `tables.py`), with the dataset's own scale:

    PARA        annotation/PARA-Images.csv (userId, sessionId, imageName, aestheticScore, ...),
                images at imgs/<sessionId>/<imageName>; annotation/PARA-UserInfo.csv, when present,
                is joined on userId and its columns become rater metadata. Scores 1-5 (0.5 steps).
    FLICKR-AES  FLICKR-AES_image_labeled_by_each_worker.csv (' worker, imagePair, score', the
                header's leading spaces stripped), images in 40K/. Scores 1-5.
    LAPIS       annotation/LAPIS_individualratings_metaANDdemodata.csv (image column `file`, or
                `image_filename`/`imageName` in other releases; participant_id; response; plus
                demographic columns kept as rater metadata), images in images/. `response` is a
                visual-analogue slider read as 0-100: the LAPIS authors' own loader bins it with
                `response // 10` into 10 bins, so the default range is [0, 100], not 1-10.
    Pick-a-Pic  Parquet shard(s) with user_id, caption, jpg_0, jpg_1, label_0, label_1, ...; the
                inline image bytes are written once to a cache folder, each file named by the
                SHA-256 of its bytes. A tie (label_0 == label_1 == 0.5) says neither image won, so
                it cannot be a row of a pairs table: ties are always dropped and counted as 'tie'.
    HPDv2       train.json: a list of records with user_hash, prompt, file_path (or image_path, as
                in the released file) listing the images, and human_preference marking the
                preferred one with 1. A record of n images gives the n-1 pairs "preferred vs each
                other image"; a record without exactly one 1 is a 'bad_preference' row. Images are
                looked up in train/ beside train.json (the released layout).

Dataset-specific row reasons, next to those in `validate.py`: 'tie', 'bad_preference'.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from reward_models.data.tables import LoadReport, PairTable, RatingData
from reward_models.data.validate import (
    CheckImages,
    OnError,
    RowChecker,
    _decodes,
    announce,
    as_id_strings,
    build_pair_table,
    build_score_table,
    read_table,
    require_columns,
)
from reward_models.errors import UserError
from reward_models.io import atomic_path, read_json

PARA_IMAGES = "PARA-Images.csv"
PARA_USERS = "PARA-UserInfo.csv"
FLICKR_AES = "FLICKR-AES_image_labeled_by_each_worker.csv"
LAPIS = "LAPIS_individualratings_metaANDdemodata.csv"
LAPIS_IMAGE_COLUMNS = ("file", "image_filename", "imageName")
LAPIS_RATER_COLUMNS = ("age", "nationality")
LAPIS_RATER_PREFIXES = ("demo_", "VAIAK", "2VAIAK")
PICKAPIC_COLUMNS = ("user_id", "jpg_0", "jpg_1", "label_0", "label_1")
HPDV2_PATH_KEYS = ("file_path", "image_path")


def score_data(df: pd.DataFrame, image_root: Path, source: Path, **checks) -> RatingData:
    """Check a (image, rater_id, score) frame read from `source`, report what was skipped, and
    wrap it as RatingData; `checks` are `build_score_table`'s keyword options."""
    table, report = build_score_table(df, image_root, **checks)
    announce(source, report)
    return RatingData(scores=table, report=report)


def find_file(path: str | Path, name: str) -> Path:
    """`path` itself if it is a file, else `name` inside `path` or inside `path`/annotation."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / name, path / "annotation" / name):
        if candidate.is_file():
            return candidate
    raise UserError(f"{path}: no {name} here or in {path / 'annotation'}; pass the file's path")


def _default_root(table_file: Path, folder: str) -> Path:
    """The image folder beside the table, or beside its parent (annotation/ and imgs/ siblings)."""
    candidates = [table_file.parent / folder, table_file.parent.parent / folder]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def join_rater_info(
    df: pd.DataFrame, info_path: Path, key: str
) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Left-join a per-rater table (one row per `key`) onto `df` by rater_id; returns its columns."""
    info = read_table(info_path, str_columns=(key,))
    require_columns(info, [key], str(info_path), "rater info")
    info = info.drop(columns=["source", "source_row"])
    info[key] = as_id_strings(info[key])
    dup = info[key].duplicated(keep=False) & info[key].notna()
    if dup.any():
        raise UserError(
            f"{info_path}: rater {info[key][dup].iloc[0]!r} has more than one row; "
            f"a rater info table needs one row per {key}"
        )
    # A name the ratings already use keeps the ratings' column; the rater's gets a prefix.
    clash = {c: f"rater_{c}" for c in info.columns if c in df.columns and c != key}
    info = info.rename(columns=clash)
    info = info.rename(columns={key: "rater_id"})
    meta = tuple(c for c in info.columns if c != "rater_id")
    return df.merge(info, on="rater_id", how="left", validate="many_to_one"), meta


def load_para(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    score_range: tuple[float, float] = (1.0, 5.0),
    check_images: CheckImages = "exists",
    on_error: OnError = "raise",
    known_raters: Iterable[str] | None = None,
    user_info: str | Path | None = None,
) -> RatingData:
    """PARA's aestheticScore per (user, image); `path` is PARA-Images.csv or the dataset folder."""
    csv = find_file(path, PARA_IMAGES)
    raw = read_table(csv, str_columns=("userId", "sessionId", "imageName"))
    require_columns(raw, ["userId", "sessionId", "imageName", "aestheticScore"], str(csv), "PARA")
    df = raw.rename(columns={"userId": "rater_id", "aestheticScore": "score"})
    session, name = as_id_strings(df["sessionId"]), as_id_strings(df["imageName"])
    df.insert(0, "image", [f"{s}/{n}" if s and n else None for s, n in zip(session, name)])
    df["rater_id"] = as_id_strings(df["rater_id"])
    meta: tuple[str, ...] = ()
    info_path = Path(user_info) if user_info is not None else csv.parent / PARA_USERS
    if user_info is not None or info_path.is_file():
        df, meta = join_rater_info(df, info_path, key="userId")
    root = Path(image_root) if image_root is not None else _default_root(csv, "imgs")
    return score_data(
        df, root, csv, score_range=score_range, check_images=check_images, on_error=on_error,
        known_raters=known_raters, meta_columns=meta,
    )  # fmt: skip


def load_flickr_aes(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    score_range: tuple[float, float] = (1.0, 5.0),
    check_images: CheckImages = "exists",
    on_error: OnError = "raise",
    known_raters: Iterable[str] | None = None,
) -> RatingData:
    """FLICKR-AES per-worker scores; `path` is the worker CSV or the folder holding it."""
    csv = find_file(path, FLICKR_AES)
    raw = read_table(csv, str_columns=("worker", "imagePair"))
    require_columns(raw, ["worker", "imagePair", "score"], str(csv), "FLICKR-AES")
    df = raw.rename(columns={"worker": "rater_id", "imagePair": "image"})
    root = Path(image_root) if image_root is not None else _default_root(csv, "40K")
    return score_data(
        df, root, csv, score_range=score_range, check_images=check_images, on_error=on_error,
        known_raters=known_raters,
    )  # fmt: skip


def load_lapis(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    score_range: tuple[float, float] = (0.0, 100.0),
    check_images: CheckImages = "exists",
    on_error: OnError = "raise",
    known_raters: Iterable[str] | None = None,
) -> RatingData:
    """LAPIS individual ratings with demographics; `path` is the CSV or the dataset folder."""
    csv = find_file(path, LAPIS)
    raw = read_table(csv, str_columns=(*LAPIS_IMAGE_COLUMNS, "participant_id"))
    image_col = next((c for c in LAPIS_IMAGE_COLUMNS if c in raw.columns), LAPIS_IMAGE_COLUMNS[0])
    require_columns(raw, [image_col, "participant_id", "response"], str(csv), "LAPIS")
    df = raw.rename(columns={image_col: "image", "participant_id": "rater_id", "response": "score"})
    root = Path(image_root) if image_root is not None else _default_root(csv, "images")
    df["image"] = _flat_fallback(as_id_strings(df["image"]), root)
    meta = [c for c in df.columns if c in LAPIS_RATER_COLUMNS or c.startswith(LAPIS_RATER_PREFIXES)]
    return score_data(
        df, root, csv, score_range=score_range, check_images=check_images, on_error=on_error,
        known_raters=known_raters, meta_columns=meta,
    )  # fmt: skip


def _flat_fallback(names: pd.Series, root: Path) -> pd.Series:
    """'<style>/<name>.jpg' -> '<name>.jpg' where only the flat file exists (LAPIS's images/)."""
    mapping = {}
    for name in names.dropna().unique():
        flat = Path(name).name
        if flat != name and not (root / name).is_file() and (root / flat).is_file():
            mapping[name] = flat
    return pd.Series([mapping.get(n, n) for n in names], index=names.index, dtype=object)


def load_pickapic(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    check_images: CheckImages = "exists",
    on_error: OnError = "raise",
    known_raters: Iterable[str] | None = None,
) -> RatingData:
    """Pick-a-Pic pairs from one Parquet shard or a folder of shards.

    `image_root` is the cache the inline images are written to (default: pickapic_images/ beside
    the shards). Bytes that are not an image (checked by signature, or fully decoded with
    check_images="decode") are 'unreadable_image' rows and are never written. Each shard is
    checked before any of its images is written; each file is written atomically, so a failed
    load leaves only whole images of earlier shards, which a rerun reuses.
    """
    path = Path(path)
    shards = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    if not shards:
        raise UserError(f"{path}: no .parquet files; pass a Pick-a-Pic shard or its folder")
    cache = Path(image_root) if image_root is not None else shards[0].parent / "pickapic_images"
    tables, report = [], None
    for shard in shards:
        table, blobs, shard_report = _pickapic_shard(
            shard, cache, check_images, on_error, known_raters
        )
        for name in table.images:  # only images of kept rows reach the cache
            _write_once(cache / name, blobs[name])
        tables.append(table.df)
        report = shard_report if report is None else report.merged(shard_report)
    df = pd.concat(tables, ignore_index=True)
    df["source"] = df["source"].astype("category")
    pairs = PairTable(df, cache, table.meta_columns)
    announce(path, report)
    return RatingData(pairs=pairs, report=report)


def _pickapic_shard(shard, cache, check_images, on_error, known_raters):
    raw = read_table(shard, str_columns=("user_id",))
    require_columns(raw, PICKAPIC_COLUMNS, str(shard), "Pick-a-Pic")
    df = raw.drop(columns=["jpg_0", "jpg_1"]).rename(columns={"user_id": "rater_id"})
    blobs: dict[str, bytes] = {}
    sides = []
    for col in ("jpg_0", "jpg_1"):
        names, unreadable = [], []
        for blob in raw[col].to_numpy():
            blob = bytes(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else None
            name = _blob_name(blob, decode=check_images == "decode") if blob else None
            unreadable.append(blob is not None and len(blob) > 0 and name is None)
            names.append(name)
            if name is not None:
                blobs[name] = blob
        sides.append((col, names, np.array(unreadable, dtype=bool)))
    df.insert(0, "image_a", sides[0][1])
    df.insert(1, "image_b", sides[1][1])
    l0 = pd.to_numeric(raw["label_0"], errors="coerce").to_numpy(dtype=np.float64)
    l1 = pd.to_numeric(raw["label_1"], errors="coerce").to_numpy(dtype=np.float64)
    df["winner"] = np.where(l0 > l1, "a", np.where(l1 > l0, "b", None))

    pre = RowChecker(df, on_error)
    for col, _, unreadable in sides:
        pre.flag(unreadable, "unreadable_image", lambda i, col=col: f"{col} is not image bytes")
    pre.drop(l0 == l1, "tie")
    table, report = build_pair_table(
        pre.kept(), cache, check_images="none", on_error=on_error, known_raters=known_raters
    )
    return table, blobs, _chained(pre.report(), report)


def _chained(first: LoadReport, second: LoadReport) -> LoadReport:
    """The report of two checks in a row: rows read by the first, kept by the second."""
    skipped = first.merged(second).skipped
    return LoadReport(rows_read=first.rows_read, rows_kept=second.rows_kept, skipped=skipped)


_SIGNATURES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"GIF8", ".gif"))


def _blob_name(blob: bytes, decode: bool) -> str | None:
    """'<sha256>.<ext>' for image bytes, None for bytes that are not an image."""
    ext = next((e for sig, e in _SIGNATURES if blob.startswith(sig)), None)
    if ext is None and blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        ext = ".webp"
    if ext is None or (decode and not _decodes(io.BytesIO(blob))):
        return None
    return hashlib.sha256(blob).hexdigest() + ext


def _write_once(path: Path, blob: bytes) -> None:
    """Content-addressed: an existing file already holds these bytes. Written atomically."""
    if path.is_file():
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)


def load_hpdv2(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    check_images: CheckImages = "exists",
    on_error: OnError = "raise",
    known_raters: Iterable[str] | None = None,
) -> RatingData:
    """HPDv2 preference records as pairs; `path` is train.json (or test-style JSON) or its folder."""
    json_path = find_file(path, "train.json")
    records = read_json(json_path)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"{json_path}: expected a JSON list of records (HPDv2 train.json layout)")
    path_key = next((k for k in HPDV2_PATH_KEYS if any(k in r for r in records)), "file_path")
    required = ["user_hash", path_key, "human_preference"]
    absent = [k for k in required if not any(k in r for r in records)]
    if absent:
        found = ", ".join(records[0]) if records else "(no records)"
        raise UserError(
            f"{json_path}: missing field(s) {', '.join(absent)} for HPDv2; record 1 has: {found}"
        )
    rows = []
    for n, rec in enumerate(records, start=1):
        paths, pref = rec.get(path_key), rec.get("human_preference")
        base = {"rater_id": rec.get("user_hash"), "prompt": rec.get("prompt"), "source_row": n}
        winner = _preferred_index(paths, pref)
        if winner is None:
            rows.append({**base, "image_a": None, "image_b": None, "winner": None, "bad": True})
            continue
        for j in range(len(paths)):
            if j != winner:
                a, b = min(winner, j), max(winner, j)
                side = "a" if winner == a else "b"
                rows.append(
                    {**base, "image_a": paths[a], "image_b": paths[b], "winner": side, "bad": False}
                )
    df = pd.DataFrame(rows, columns=["image_a", "image_b", "rater_id", "winner", "prompt",
                                     "source_row", "bad"])  # fmt: skip
    df["source"] = pd.Categorical([str(json_path)] * len(df))
    bad = df.pop("bad").to_numpy(dtype=bool)
    pre = RowChecker(df, on_error)
    pre.flag(
        bad,
        "bad_preference",
        lambda i: f"{path_key} and human_preference must be equal-length lists with exactly one 1",
    )
    if image_root is not None:
        root = Path(image_root)
    else:  # released layout: train.json beside train/
        root = json_path.parent / json_path.stem
        root = root if root.is_dir() else json_path.parent
    table, report = build_pair_table(
        pre.kept(), root, check_images=check_images, on_error=on_error, known_raters=known_raters
    )
    report = _chained(pre.report(), report)
    announce(json_path, report)
    return RatingData(pairs=table, report=report)


def _preferred_index(paths, pref) -> int | None:
    if not (isinstance(paths, list) and isinstance(pref, list)):
        return None
    if len(paths) < 2 or len(paths) != len(pref) or sorted(pref) != [0] * (len(pref) - 1) + [1]:
        return None
    return pref.index(1)
