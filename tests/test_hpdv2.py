"""HPDv2 as released: train.json beside train/ (either way its paths are written), and the test
split's per-annotator rankings, each read as pairs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from reward_models.data import detect_format, load_ratings
from reward_models.errors import UserError


def save_jpeg(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 80, 80)).save(path, format="JPEG")


def test_train_paths_written_from_the_json_folder_resolve_there_and_say_so(tmp_path, caplog):
    for i in range(3):
        save_jpeg(tmp_path / "train" / f"{i:05d}.jpg", 60 * i)
    records = [
        {
            "user_hash": "9f2c",
            "prompt": "a cat",
            "human_preference": [0, 1, 0],
            "file_path": ["train/00000.jpg", "train/00001.jpg", "train/00002.jpg"],
        },
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    with caplog.at_level(logging.INFO, logger="reward_models.data"):
        pairs = load_ratings(tmp_path).pairs  # train/ exists beside train.json: tried first
    assert pairs.image_root == tmp_path  # not train/, which would look for train/train/00000.jpg
    assert pairs.df[["image_a", "image_b", "winner"]].values.tolist() == [
        ["train/00000.jpg", "train/00001.jpg", "b"],
        ["train/00001.jpg", "train/00002.jpg", "a"],
    ]
    assert f"'train/00000.jpg') are relative to {tmp_path}, which holds 3 of 3" in caplog.text


def write_test_split(root: Path) -> Path:
    """HPD/test.json + HPD/test/: averaged ranks, and each annotator's own in raw_annotations."""
    for i in range(4):
        save_jpeg(root / "test" / f"{i:05d}.jpg", 50 * i)
    three = ["00000.jpg", "00001.jpg", "00002.jpg"]
    records = [
        {
            "prompt": "a lighthouse",
            "image_path": three,
            "rank": [1, 3, 2],
            "raw_annotations": [
                {"user_hash": "u1", "rank": [1, 2, 3]},
                {"user_hash": "u2", "rank": [2, 1, 1]},
            ],
        },
        {
            "prompt": "a fox",
            "image_path": ["00003.jpg", "00000.jpg"],
            "rank": [2, 1],
            "user_hash": "u3",
        },
        {"prompt": "no one", "image_path": ["00001.jpg", "00002.jpg"], "rank": [1, 2]},
        {
            "prompt": "short",
            "image_path": three,
            "rank": [1, 2, 3],
            "raw_annotation": [{"user_hash": "u1", "rank": [1, 2]}],
        },
    ]
    path = root / "test.json"
    path.write_text(json.dumps(records))
    return path


def test_test_split_rankings_load_as_pairs_per_annotator_with_equal_ranks_as_ties(tmp_path):
    path = write_test_split(tmp_path)
    assert detect_format(tmp_path) == ("hpdv2", path)
    with pytest.warns(UserWarning, match=r"skipped 2 of 9 rows \(1 bad_ranking, 1 missing_value\)"):
        data = load_ratings(tmp_path, on_error="skip")
    df = data.pairs.df
    assert df[["rater_id", "image_a", "image_b", "winner"]].values.tolist() == [
        ["u1", "00000.jpg", "00001.jpg", "a"],  # the lower rank is preferred
        ["u1", "00000.jpg", "00002.jpg", "a"],
        ["u1", "00001.jpg", "00002.jpg", "a"],
        ["u2", "00000.jpg", "00001.jpg", "b"],
        ["u2", "00000.jpg", "00002.jpg", "b"],
        ["u2", "00001.jpg", "00002.jpg", "tie"],  # u2 ranked them equal
        ["u3", "00003.jpg", "00000.jpg", "b"],  # no raw annotations: the record's own user
    ]
    assert df["source_row"].tolist() == [1] * 6 + [2]
    assert data.pairs.image_root == tmp_path / "test"


def test_test_split_records_without_an_annotator_or_with_a_short_ranking_are_named(tmp_path):
    path = write_test_split(tmp_path)
    with pytest.raises(
        UserError, match=r"test\.json record 3: no raw_annotations and no user_hash; a per-rater"
    ):
        load_ratings(path)
    records = json.loads(path.read_text())
    path.write_text(json.dumps(records[:2] + records[3:]))
    with pytest.raises(
        UserError, match=r"record 3: image_path and rank must be equal-length lists"
    ):
        load_ratings(path)
