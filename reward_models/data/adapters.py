"""Adapters for published per-rater datasets, each reading the layout exactly as released.

Each returns `RatingData` in the common tables (see `tables.py`), with the dataset's own scale:

    PARA        annotation/PARA-Images.csv (userId, sessionId, imageName, aestheticScore, ...),
                images at imgs/<sessionId>/<imageName>; annotation/PARA-UserInfo.csv, when present,
                is joined on userId and its columns become rater metadata. Scores 1-5 (0.5 steps).
    FLICKR-AES  FLICKR-AES_image_labeled_by_each_worker.csv (' worker, imagePair, score', the
                header's leading spaces stripped), images in 40K/. Scores 1-5.
    LAPIS       annotation/LAPIS_individualratings_metaANDdemodata.csv (image column `file`, or
                `image_filename`/`imageName` in other releases; participant_id; response; plus
                demographic columns such as age, gender, nationality kept as rater metadata),
                images in images/. `response` is a visual-analogue slider read as 0-100: the LAPIS
                authors' own loader bins it with `response // 10` into 10 bins, so the default
                range is [0, 100], not 1-10.
    Pick-a-Pic  Parquet shard(s) with user_id, caption, jpg_0, jpg_1, label_0, label_1, ...; the
                inline image bytes are written once to a cache folder, each file named by the
                SHA-256 of its bytes. label_0/label_1 of 1/0 or 0/1 name the preferred image;
                0.5/0.5 is a tie, kept as winner 'tie' (the pairwise loss takes it as the soft
                label 0.5). Bad rows are named in the shard's own columns (user_id, jpg_1,
                label_0, ...).
    HPDv2       see `hpdv2.py` (train.json preferences and test.json rankings).

Dataset-specific row reason, next to those in `validate.py`: 'bad_label' (Pick-a-Pic labels that
are not one of the three choices).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from reward_models.data.tables import PairTable, RatingData
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
from reward_models.io import atomic_path

PARA_IMAGES = "PARA-Images.csv"
PARA_USERS = "PARA-UserInfo.csv"
FLICKR_AES = "FLICKR-AES_image_labeled_by_each_worker.csv"
LAPIS = "LAPIS_individualratings_metaANDdemodata.csv"
LAPIS_IMAGE_COLUMNS = ("file", "image_filename", "imageName")
LAPIS_RATER_COLUMNS = ("age", "gender", "nationality")
LAPIS_RATER_PREFIXES = ("demo_", "VAIAK", "2VAIAK")
PICKAPIC_COLUMNS = ("user_id", "jpg_0", "jpg_1", "label_0", "label_1")
PICKAPIC_LABELS = {(1.0, 0.0): "a", (0.0, 1.0): "b", (0.5, 0.5): "tie"}  # (label_0, label_1)


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
    raw = read_table(
        csv, str_columns=("userId", "sessionId", "imageName"), literal_columns=("aestheticScore",)
    )
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
        df,
        root,
        csv,
        score_range=score_range,
        check_images=check_images,
        on_error=on_error,
        known_raters=known_raters,
        meta_columns=meta,
    )


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
    raw = read_table(csv, str_columns=("worker", "imagePair"), literal_columns=("score",))
    require_columns(raw, ["worker", "imagePair", "score"], str(csv), "FLICKR-AES")
    df = raw.rename(columns={"worker": "rater_id", "imagePair": "image"})
    root = Path(image_root) if image_root is not None else _default_root(csv, "40K")
    return score_data(
        df,
        root,
        csv,
        score_range=score_range,
        check_images=check_images,
        on_error=on_error,
        known_raters=known_raters,
    )


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
    raw = read_table(
        csv, str_columns=(*LAPIS_IMAGE_COLUMNS, "participant_id"), literal_columns=("response",)
    )
    image_col = next((c for c in LAPIS_IMAGE_COLUMNS if c in raw.columns), LAPIS_IMAGE_COLUMNS[0])
    require_columns(raw, [image_col, "participant_id", "response"], str(csv), "LAPIS")
    df = raw.rename(columns={image_col: "image", "participant_id": "rater_id", "response": "score"})
    root = Path(image_root) if image_root is not None else _default_root(csv, "images")
    df["image"] = _flat_fallback(as_id_strings(df["image"]), root)
    meta = [c for c in df.columns if c in LAPIS_RATER_COLUMNS or c.startswith(LAPIS_RATER_PREFIXES)]
    return score_data(
        df,
        root,
        csv,
        score_range=score_range,
        check_images=check_images,
        on_error=on_error,
        known_raters=known_raters,
        meta_columns=meta,
    )


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
    df["rater_id"] = as_id_strings(df["rater_id"])
    blobs: dict[str, bytes] = {}
    sides = {
        col: _cache_names(raw[col], check_images == "decode", blobs) for col in ("jpg_0", "jpg_1")
    }
    df.insert(0, "image_a", sides["jpg_0"][0])
    df.insert(1, "image_b", sides["jpg_1"][0])
    l0 = pd.to_numeric(raw["label_0"], errors="coerce").to_numpy(dtype=np.float64)
    l1 = pd.to_numeric(raw["label_1"], errors="coerce").to_numpy(dtype=np.float64)
    df["winner"] = [PICKAPIC_LABELS.get((a, b)) for a, b in zip(l0.tolist(), l1.tolist())]

    pre = _check_shard(df, raw, sides, on_error)
    table, report = build_pair_table(
        pre.kept(), cache, check_images="none", on_error=on_error, known_raters=known_raters
    )
    return table, blobs, pre.report().followed_by(report)


def _check_shard(df: pd.DataFrame, raw: pd.DataFrame, sides: dict, on_error: OnError) -> RowChecker:
    """Flag a shard's bad rows in its own column names (user_id, jpg_1, label_0), so that
    build_pair_table, which speaks of rater_id and image_b, finds nothing left to say."""
    pre = RowChecker(df, on_error)
    pre.flag(df["rater_id"].isna(), "missing_value", lambda i: "empty user_id; every row needs one")
    for col, (_, empty, unreadable) in sides.items():
        pre.flag(empty, "missing_value", lambda i, c=col: f"empty {c}; a choice needs two images")
        pre.flag(unreadable, "unreadable_image", lambda i, c=col: f"{c} is not image bytes")
    labels = raw["label_0"].to_numpy(), raw["label_1"].to_numpy()
    pre.flag(
        df["winner"].isna(),
        "bad_label",
        lambda i: (
            f"label_0 {_shown(labels[0][i])} and label_1 {_shown(labels[1][i])} are not a choice; "
            f"expected 1 and 0 (jpg_0 preferred), 0 and 1 (jpg_1), or 0.5 and 0.5 (a tie)"
        ),
    )
    pre.flag(
        df["image_a"] == df["image_b"],
        "same_image",
        lambda i: "jpg_0 and jpg_1 hold the same image; a choice needs two different images",
    )
    return pre


def _cache_names(column: pd.Series, decode: bool, blobs: dict[str, bytes]):
    """Each cell's cache file name (None where empty or not an image), and the masks of empty and
    of non-image cells; the bytes of every named image are added to `blobs`."""
    names, empty, unreadable = [], [], []
    for blob in column.to_numpy():
        blob = bytes(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else b""
        name = _blob_name(blob, decode) if blob else None
        names.append(name)
        empty.append(not blob)
        unreadable.append(bool(blob) and name is None)
        if name is not None:
            blobs[name] = blob
    return names, np.array(empty, dtype=bool), np.array(unreadable, dtype=bool)


def _shown(value) -> str:
    """A cell as a message quotes it: 'empty' for a missing value, numbers as written (1, 0.5)."""
    if pd.isna(value):
        return "empty"
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return f"{float(value):g}"
    return repr(value)


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
