"""Specification of reward_models.data: our own rating tables, their validation, and splits."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reward_models.data import (
    RatingData,
    build_pair_table,
    build_score_table,
    check_known_raters,
    few_shot,
    load_ratings,
    split_by_image,
    split_by_rater,
)
from reward_models.errors import UserError

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (240, 240, 240), (10, 10, 10)]


def write_images(root: Path, n: int = 5) -> list[str]:
    """n tiny real PNGs under root/images, named as a table would name them."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"images/img_{i}.png"
        Image.new("RGB", (8, 8), COLOURS[i % len(COLOURS)]).save(root / name)
        names.append(name)
    return names


def write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path, index=False)
    return path


@pytest.fixture
def world(tmp_path) -> Path:
    """A folder laid out like the toy world: images/, scores.csv, pairs.csv, raters.csv."""
    names = write_images(tmp_path)
    scores = pd.DataFrame(
        {
            "image": [names[0], names[1], names[2], names[0], names[3], names[4]],
            "rater_id": ["007", "007", "007", "12", "12", "12"],
            "score": [7.0, 2.5, 10.0, 0.0, 4.0, 6.0],
            "session": ["s1", "s1", "s2", "s3", "s3", "s3"],
        }
    )
    pairs = pd.DataFrame(
        {
            "image_a": [names[0], names[1], names[2], names[3]],
            "image_b": [names[1], names[2], names[3], names[4]],
            "rater_id": ["007", "007", "12", "12"],
            "winner": ["a", "B", 0, 1],
        }
    )
    raters = pd.DataFrame({"rater_id": ["007", "12"], "age": [31, 45]})
    write(scores, tmp_path / "scores.csv")
    write(pairs, tmp_path / "pairs.csv")
    write(raters, tmp_path / "raters.csv")
    return tmp_path


def scores_csv(tmp_path: Path, rows: list[tuple], name="scores.csv") -> Path:
    df = pd.DataFrame(rows, columns=["image", "rater_id", "score"])
    return write(df, tmp_path / name)


# --- loading our own tables ---------------------------------------------------------------------


def test_scores_keep_rater_ids_as_strings_and_extra_columns(world):
    data = load_ratings(world / "scores.csv")
    table = data.scores
    assert data.pairs is None
    assert len(table) == 6
    assert table.rater_ids == ["007", "12"]  # the leading zero survives
    assert table.images == [f"images/img_{i}.png" for i in range(5)]
    np.testing.assert_array_equal(table.scores, [7.0, 2.5, 10.0, 0.0, 4.0, 6.0])
    assert table.df["session"].tolist() == ["s1", "s1", "s2", "s3", "s3", "s3"]
    assert table.image_path("images/img_0.png") == world / "images/img_0.png"
    assert table.where(4) == f"{world / 'scores.csv'} line 6"
    assert data.report.rows_read == 6 and data.report.skipped == {}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_the_same_scores_read_the_same_from_csv_jsonl_and_parquet(tmp_path, suffix):
    names = write_images(tmp_path, 2)
    df = pd.DataFrame({"image": names, "rater_id": [3, 4], "score": [1.5, 9.0]})
    table = load_ratings(write(df, tmp_path / f"scores{suffix}")).scores
    assert table.df["rater_id"].tolist() == ["3", "4"]
    assert table.df["image"].tolist() == names
    np.testing.assert_array_equal(table.scores, [1.5, 9.0])


def test_pair_winners_accept_a_b_in_any_case_and_0_1_as_the_winning_index(world):
    pairs = load_ratings(world / "pairs.csv").pairs
    assert pairs.df["winner"].tolist() == ["a", "b", "a", "b"]
    np.testing.assert_array_equal(pairs.a_wins, [True, False, True, False])
    assert pairs.images == [f"images/img_{i}.png" for i in range(5)]
    # Parquet and JSONL keep integers: 0 names image_a, 1 image_b.
    df = pd.read_csv(world / "pairs.csv").assign(winner=[0, 1, 1, 0])
    for suffix in (".parquet", ".jsonl"):
        path = write(df, world / f"int_pairs{suffix}")
        assert load_ratings(path).pairs.df["winner"].tolist() == ["a", "b", "b", "a"]


def test_a_folder_loads_scores_and_pairs_and_joins_rater_info(world):
    data = load_ratings(world, rater_info=world / "raters.csv")
    assert len(data.scores) == 6 and len(data.pairs) == 4
    assert data.rater_ids == ["007", "12"]
    assert data.report.rows_read == 10 and data.report.rows_kept == 10
    meta = data.scores.rater_metadata()
    assert meta.loc["007", "age"] == 31 and meta.loc["12", "age"] == 45
    assert data.scores.meta_columns == ("age",)


def test_auto_tells_scores_from_pairs_by_columns_and_refuses_to_guess(tmp_path, world):
    assert load_ratings(world / "pairs.csv").scores is None
    odd = write(pd.DataFrame({"picture": ["x"], "who": ["r"]}), tmp_path / "odd.csv")
    with pytest.raises(
        UserError, match=r"odd\.csv: cannot tell scores from pairs; found columns: picture, who"
    ):
        load_ratings(odd)
    with pytest.raises(UserError, match=r"unsupported|cannot tell the layout of a '\.txt'"):
        load_ratings(write_text(tmp_path / "ratings.txt", "x"))
    with pytest.raises(UserError, match="no such file or folder"):
        load_ratings(tmp_path / "absent.csv")
    with pytest.raises(UserError, match="unknown format 'xlsx'"):
        load_ratings(world, format="xlsx")
    with pytest.raises(UserError, match="check_images must be 'none', 'exists' or 'decode'"):
        load_ratings(world, check_images="maybe")
    with pytest.raises(UserError, match=r"score_range must be \(low, high\) with low <= high"):
        load_ratings(world / "scores.csv", score_range=(10, 0))


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- validation errors name the file and the row -------------------------------------------------


def test_missing_columns_are_named_with_the_columns_found(tmp_path):
    path = write(
        pd.DataFrame({"image": ["a.png"], "rater": ["r"], "value": [3]}), tmp_path / "s.csv"
    )
    with pytest.raises(UserError) as e:
        load_ratings(path, format="scores")
    msg = str(e.value)
    assert "s.csv: missing column(s) rater_id, score for a scores table" in msg
    assert "found columns: image, rater, value" in msg


def test_a_nan_score_names_the_csv_line(tmp_path):
    names = write_images(tmp_path, 3)
    path = scores_csv(tmp_path, [(names[0], "r1", 5), (names[1], "r1", 6), (names[2], "r1", None)])
    with pytest.raises(UserError, match=r"scores\.csv line 4: score is empty"):
        load_ratings(path)


def test_a_score_out_of_range_names_the_line_and_the_range_and_the_range_is_configurable(tmp_path):
    names = write_images(tmp_path, 2)
    path = scores_csv(tmp_path, [(names[0], "r1", 5), (names[1], "r2", 11)])
    with pytest.raises(UserError, match=r"scores\.csv line 3: score 11 is outside \[0, 10\]"):
        load_ratings(path)
    assert load_ratings(path, score_range=(0, 20)).scores.scores.tolist() == [5.0, 11.0]


def test_a_missing_image_names_the_line_and_the_path_looked_for(tmp_path):
    names = write_images(tmp_path, 1)
    path = scores_csv(tmp_path, [(names[0], "r1", 5), ("images/gone.png", "r1", 6)])
    with pytest.raises(UserError) as e:
        load_ratings(path)
    assert f"scores.csv line 3: image file not found: {tmp_path / 'images/gone.png'}" in str(
        e.value
    )
    # Pointing image_root elsewhere makes every image missing: the first row is named.
    with pytest.raises(UserError, match=r"line 2: image file not found"):
        load_ratings(path, image_root=tmp_path / "elsewhere")


def test_decode_check_finds_a_file_that_is_not_an_image(tmp_path):
    names = write_images(tmp_path, 1)
    (tmp_path / "images/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    path = scores_csv(tmp_path, [(names[0], "r1", 5), ("images/broken.png", "r1", 6)])
    assert len(load_ratings(path).scores) == 2  # it exists, which is all "exists" checks
    with pytest.raises(UserError, match=r"line 3: image file cannot be decoded: .*broken\.png"):
        load_ratings(path, check_images="decode")


def test_a_pair_naming_one_image_twice_and_a_bad_winner_are_errors(tmp_path):
    names = write_images(tmp_path, 2)
    same = pd.DataFrame(
        {
            "image_a": names,
            "image_b": [names[1], names[1]],
            "rater_id": ["r", "r"],
            "winner": ["a", "b"],
        }
    )
    with pytest.raises(UserError, match=r"pairs\.csv line 3: the pair names the same image twice"):
        load_ratings(write(same, tmp_path / "pairs.csv"))
    bad = same.assign(image_b=[names[1], names[0]], winner=["a", "left"])
    with pytest.raises(UserError, match=r"pairs\.jsonl line 2: winner 'left' is not 'a' or 'b'"):
        load_ratings(write(bad, tmp_path / "pairs.jsonl"))


def test_a_broken_jsonl_line_is_named(tmp_path):
    path = write_text(
        tmp_path / "scores.jsonl", '{"image": "a", "rater_id": 1, "score": 2}\n{oops\n'
    )
    with pytest.raises(UserError, match=r"scores\.jsonl line 2: not valid JSON"):
        load_ratings(path)


def test_an_unknown_rater_in_an_evaluation_split_is_named(tmp_path):
    names = write_images(tmp_path, 2)
    path = scores_csv(tmp_path, [(names[0], "r1", 5), (names[1], "r2", 6), (names[0], "r9", 1)])
    with pytest.raises(
        UserError, match=r"scores\.csv line 4: rater 'r9' is not one of the 2 known"
    ):
        load_ratings(path, known_raters=["r1", "r2"])
    table = load_ratings(path).scores
    with pytest.warns(UserWarning, match="skipped 1 of 3 rows"):
        kept, report = check_known_raters(table, ["r1", "r2"], on_error="skip")
    assert kept.rater_ids == ["r1", "r2"] and report.skipped == {"unknown_rater": 1}


def test_skip_drops_bad_rows_counts_each_reason_and_warns(tmp_path):
    names = write_images(tmp_path, 3)
    rows = [
        (names[0], "r1", 5),
        (names[1], "r1", None),  # nan_score
        (names[2], "r1", 7),
        (names[0], "r2", "n/a"),  # nan_score: not a number
        (names[1], "r2", -1),  # score_out_of_range
        (None, "r2", 3),  # missing_value
        ("images/gone.png", "r3", 4),  # missing_image
        (names[2], "r3", 8),
    ]
    path = scores_csv(tmp_path, rows)
    with pytest.warns(
        UserWarning,
        match=r"skipped 5 of 8 rows \(1 missing_image, 1 missing_value, 2 nan_score, 1 score_out_of_range\)",
    ):
        data = load_ratings(path, on_error="skip")
    assert data.report.skipped == {
        "missing_value": 1,
        "nan_score": 2,
        "score_out_of_range": 1,
        "missing_image": 1,
    }
    assert (data.report.rows_read, data.report.rows_kept) == (8, 3)
    assert data.scores.scores.tolist() == [5.0, 7.0, 8.0]
    assert [data.scores.where(i).split()[-1] for i in range(3)] == ["2", "4", "9"]


def test_a_clean_load_does_not_warn(world):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_ratings(world)


def test_tables_built_in_memory_name_their_row(tmp_path):
    df = pd.DataFrame({"image": ["a", "b"], "rater_id": ["r", "r"], "score": [1.0, float("nan")]})
    with pytest.raises(UserError, match=r"\(in-memory table\) row 2: score is empty"):
        build_score_table(df, tmp_path, check_images="none")
    with pytest.raises(UserError, match="on_error must be 'raise' or 'skip'"):
        build_score_table(df, tmp_path, check_images="none", on_error="ignore")


# --- splits ---------------------------------------------------------------------------------------


def synthetic(n_raters=10, n_images=40, per_rater=12, seed=0) -> RatingData:
    """Raters each scoring and comparing random images (no files: check_images='none')."""
    rng = np.random.default_rng(seed)
    srows, prows = [], []
    for r in range(n_raters):
        seen = rng.choice(n_images, per_rater, replace=False)
        srows += [(f"im{i:02d}", f"r{r}", float(rng.integers(0, 11))) for i in seen]
        prows += [(f"im{a:02d}", f"im{b:02d}", f"r{r}", "a") for a, b in zip(seen[::2], seen[1::2])]
    scores, _ = build_score_table(
        pd.DataFrame(srows, columns=["image", "rater_id", "score"]), Path("."), check_images="none"
    )
    pairs, _ = build_pair_table(
        pd.DataFrame(prows, columns=["image_a", "image_b", "rater_id", "winner"]),
        Path("."),
        check_images="none",
    )
    return RatingData(scores=scores, pairs=pairs)


def test_split_by_rater_holds_out_whole_raters_deterministically():
    data = synthetic()
    train, test = split_by_rater(data, frac_test=0.3, seed=1)
    assert len(test.rater_ids) == 3 and len(train.rater_ids) == 7
    assert set(train.rater_ids).isdisjoint(test.rater_ids)
    assert len(train.scores) + len(test.scores) == len(data.scores) == 120
    assert len(train.pairs) + len(test.pairs) == len(data.pairs) == 60
    again, _ = split_by_rater(data, frac_test=0.3, seed=1)[::-1]
    assert again.rater_ids == test.rater_ids
    other = [split_by_rater(data, 0.3, seed=s)[1].rater_ids for s in range(2, 6)]
    assert any(o != test.rater_ids for o in other)  # the seed matters


def test_split_by_image_holds_out_images_and_every_rater_keeps_training_data():
    data = synthetic(n_raters=8, n_images=30, per_rater=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pairs straddling the split are reported in a warning
        train, test = split_by_image(data, frac_test=0.25, seed=0)
        again = split_by_image(data, frac_test=0.25, seed=0)[1]
    held_out = set(test.images)
    assert set(train.images).isdisjoint(held_out)
    assert 0 < len(held_out) <= round(0.25 * len(data.images))
    assert set(train.scores.rater_ids) == set(data.scores.rater_ids)  # nobody lost all training
    assert again.images == test.images
    assert len(train.scores) + len(test.scores) == len(data.scores)


def test_split_by_image_never_holds_out_a_raters_only_rating():
    df = pd.DataFrame(
        [("only", "lonely", 5.0)] + [(f"im{i}", "busy", 5.0) for i in range(9)],
        columns=["image", "rater_id", "score"],
    )
    scores, _ = build_score_table(df, Path("."), check_images="none")
    for seed in range(10):
        train, test = split_by_image(RatingData(scores=scores), frac_test=0.5, seed=seed)
        assert "only" in train.images and "only" not in test.images
        assert len(test.images) == 5


def test_split_by_image_drops_pairs_across_the_split_with_a_warning():
    df = pd.DataFrame(
        [("x", "y", "r", "a"), ("x", "z", "r", "b"), ("y", "z", "r", "a"), ("w", "v", "r", "a")],
        columns=["image_a", "image_b", "rater_id", "winner"],
    )
    pairs, _ = build_pair_table(df, Path("."), check_images="none")
    with pytest.warns(UserWarning, match="pairs have one image on each side"):
        train, test = split_by_image(RatingData(pairs=pairs), frac_test=0.2, seed=3)
    assert len(train.pairs) + len(test.pairs) < 4
    assert set(train.images).isdisjoint(test.images)


def test_split_arguments_are_checked():
    data = synthetic(n_raters=1)
    with pytest.raises(UserError, match="cannot split 1 raters"):
        split_by_rater(data, 0.5, seed=0)
    with pytest.raises(UserError, match="frac_test must be between 0 and 1"):
        split_by_image(data, 1.0, seed=0)


def test_few_shot_splits_one_raters_ratings_into_context_and_target():
    scores = synthetic().scores
    context, target = few_shot(scores, "r4", k=5, seed=0)
    assert len(context) == 5 and len(target) == 7
    assert context.rater_ids == target.rater_ids == ["r4"]
    key = ["image", "score"]
    both = pd.concat([context.df[key], target.df[key]])
    assert not both.duplicated().any() and len(both) == len(scores.rows_of("r4"))
    assert few_shot(scores, "r4", k=5, seed=0)[0].df.equals(context.df)
    assert not few_shot(scores, "r4", k=5, seed=1)[0].df.equals(context.df)
    with pytest.raises(UserError, match="k=12 but rater 'r4' has 12 ratings"):
        few_shot(scores, "r4", k=12, seed=0)
    with pytest.raises(UserError, match="rater 'nobody' has no ratings"):
        few_shot(scores, "nobody", k=1, seed=0)


def test_json_of_a_table_folder_is_not_mistaken(world):
    # A stray JSON beside the tables does not change what a folder load finds.
    (world / "notes.json").write_text(json.dumps({"note": 1}))
    data = load_ratings(world)
    assert len(data.scores) == 6 and len(data.pairs) == 4
