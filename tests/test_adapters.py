"""Each dataset adapter on a small synthetic copy of that dataset's released layout."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reward_models.data import detect_format, load_ratings
from reward_models.errors import UserError


def jpeg_bytes(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="JPEG")
    return buf.getvalue()


def save_jpeg(path: Path, colour=(120, 60, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(colour))


# --- PARA ----------------------------------------------------------------------------------------


@pytest.fixture
def para(tmp_path) -> Path:
    """PARA/annotation/PARA-Images.csv + PARA-UserInfo.csv, images in PARA/imgs/<session>/."""
    root = tmp_path / "PARA"
    (root / "annotation").mkdir(parents=True)
    images = pd.DataFrame(
        {
            "userId": ["A0c1", "A0c1", "B7f2", "B7f2"],
            "sessionId": ["session1", "session2", "session1", "session2"],
            "imageName": ["iaa_pub1_.jpg", "iaa_pub2_.jpg", "iaa_pub1_.jpg", "iaa_pub2_.jpg"],
            "aestheticScore": [3.5, 5.0, 1.0, 2.5],
            "qualityScore": [3.0, 4.5, 1.5, 2.0],
            "compositionScore": [3.0, 4.0, 1.0, 3.0],
            "colorScore": [4.0, 5.0, 2.0, 2.0],
            "dofScore": [3.0, 4.0, 1.0, 2.0],
            "contentScore": [3.0, 5.0, 1.0, 3.0],
            "lightScore": [4.0, 4.0, 1.0, 2.0],
            "contentPreference": [3.0, 5.0, 1.0, 2.0],
            "willingnessToShare": [2.0, 5.0, 1.0, 2.0],
        }
    )
    images.to_csv(root / "annotation" / "PARA-Images.csv", index=False)
    users = pd.DataFrame(
        {
            "userId": ["A0c1", "B7f2"],
            "age": ["18-21", "30-34"],
            "gender": ["female", "male"],
            "EducationalLevel": ["University", "Senior high school"],
            "artExperience": ["proficient", "beginner"],
            "photographyExperience": ["competent", "beginner"],
            "personality-E": [6, 3],
            "personality-A": [7, 5],
            "personality-N": [4, 8],
            "personality-O": [8, 2],
            "personality-C": [6, 6],
        }
    )
    users.to_csv(root / "annotation" / "PARA-UserInfo.csv", index=False)
    for i, (s, n) in enumerate(zip(images.sessionId, images.imageName)):
        save_jpeg(root / "imgs" / s / n, (40 * i, 100, 200))
    return root


def test_para_reads_aesthetic_scores_with_session_image_paths_and_user_info(para):
    data = load_ratings(para)  # the dataset folder; the layout is found by file name
    table = data.scores
    assert table.image_root == para / "imgs"
    assert table.df["image"].tolist()[:2] == ["session1/iaa_pub1_.jpg", "session2/iaa_pub2_.jpg"]
    np.testing.assert_array_equal(table.scores, [3.5, 5.0, 1.0, 2.5])
    assert table.df["qualityScore"].tolist() == [3.0, 4.5, 1.5, 2.0]  # other columns are kept
    meta = table.rater_metadata()
    assert list(meta.index) == ["A0c1", "B7f2"]
    assert meta.loc["B7f2", "age"] == "30-34" and meta.loc["A0c1", "personality-O"] == 8
    assert "age" in table.meta_columns and "userId" not in table.meta_columns


def test_para_scale_is_1_to_5_and_user_info_is_optional(para):
    csv = para / "annotation" / "PARA-Images.csv"
    df = pd.read_csv(csv)
    df.loc[2, "aestheticScore"] = 5.5
    df.to_csv(csv, index=False)
    with pytest.raises(UserError, match=r"PARA-Images\.csv line 4: score 5\.5 is outside \[1, 5\]"):
        load_ratings(csv)
    (para / "annotation" / "PARA-UserInfo.csv").unlink()
    table = load_ratings(csv, score_range=(1, 6)).scores
    assert table.meta_columns == () and len(table) == 4


def test_a_literal_nan_score_is_quoted_as_written_not_called_empty(para):
    csv = para / "annotation" / "PARA-Images.csv"
    lines = csv.read_text().splitlines()
    lines[2] = lines[2].replace(",5.0,", ",NaN,", 1)  # line 3: the file says NaN
    lines[3] = lines[3].replace(",1.0,", ",,", 1)  # line 4: the field is empty
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"PARA-Images\.csv line 3: score 'NaN' is not a number"):
        load_ratings(csv)
    with pytest.warns(UserWarning, match="2 nan_score"):
        assert load_ratings(csv, on_error="skip").scores.scores.tolist() == [3.5, 2.5]
    csv.write_text("\n".join(lines[:3] + lines[4:]).replace(",NaN,", ",,") + "\n")
    with pytest.raises(UserError, match=r"line 3: score is empty"):
        load_ratings(csv)


def test_para_names_missing_columns(tmp_path):
    csv = tmp_path / "PARA-Images.csv"
    pd.DataFrame({"userId": ["u"], "imageName": ["x.jpg"], "score": [3]}).to_csv(csv, index=False)
    with pytest.raises(
        UserError, match=r"missing column\(s\) sessionId, aestheticScore for a PARA"
    ):
        load_ratings(csv)


# --- FLICKR-AES ----------------------------------------------------------------------------------


def test_flickr_aes_strips_the_released_headers_leading_spaces(tmp_path):
    names = ["farm1_262_20057391036_ba0a8a8fb2_b.jpg", "farm4_3821_14541565541_02e7b08e0a_b.jpg"]
    for i, name in enumerate(names):
        save_jpeg(tmp_path / "40K" / name, (90 * i, 20, 20))
    csv = tmp_path / "FLICKR-AES_image_labeled_by_each_worker.csv"
    csv.write_text(
        " worker, imagePair, score\n"
        f"A3BXYZ2K1T0M0E,{names[0]},4\n"
        f"A3BXYZ2K1T0M0E,{names[1]},2\n"
        f"AQ5R20E5G3W1H, {names[0]}, 5\n"
    )
    assert detect_format(csv) == ("flickr_aes", csv)
    table = load_ratings(tmp_path).scores
    assert table.rater_ids == ["A3BXYZ2K1T0M0E", "AQ5R20E5G3W1H"]
    assert table.df["image"].tolist() == [names[0], names[1], names[0]]
    np.testing.assert_array_equal(table.scores, [4, 2, 5])
    assert table.image_root == tmp_path / "40K"
    csv.write_text(csv.read_text() + f"AQ5R20E5G3W1H,{names[1]},0\n")
    with pytest.raises(UserError, match=r"line 5: score 0 is outside \[1, 5\]"):
        load_ratings(csv, format="flickr-aes")


# --- LAPIS ---------------------------------------------------------------------------------------


def lapis_frame(image_column: str, images: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            image_column: images,
            "participant_id": [101, 101, 202],
            "response": [73, 12, 100],
            "image_id": [5, 9, 5],
            "age": [24, 24, 61],
            "gender": ["female", "female", "male"],
            "nationality": ["Belgian", "Belgian", "Dutch"],
            "demo_gender": ["female", "female", "male"],
            "demo_edu": ["Master", "Master", "Bachelor"],
            "demo_colorblind": ["no", "no", "no"],
            "VAIAK1": [5, 5, 2],
            "2VAIAK1": [4, 4, 1],
        }
    )


def test_lapis_keeps_demographics_as_rater_metadata_on_a_0_to_100_scale(tmp_path):
    (tmp_path / "annotation").mkdir()
    for name in ("Monet_1.jpg", "Klimt_3.jpg"):
        save_jpeg(tmp_path / "images" / name)
    images = ["Monet_1.jpg", "Klimt_3.jpg", "Monet_1.jpg"]
    lapis_frame("file", images).to_csv(
        tmp_path / "annotation" / "LAPIS_individualratings_metaANDdemodata.csv", index=False
    )
    table = load_ratings(tmp_path).scores
    assert table.rater_ids == ["101", "202"]
    np.testing.assert_array_equal(table.scores, [73, 12, 100])
    assert set(table.meta_columns) == {
        "age",
        "gender",
        "nationality",
        "demo_gender",
        "demo_edu",
        "demo_colorblind",
        "VAIAK1",
        "2VAIAK1",
    }
    assert "image_id" not in table.meta_columns  # an image attribute, not the rater's
    meta = table.rater_metadata()
    assert meta.loc["202", "nationality"] == "Dutch" and meta.loc["202", "gender"] == "male"


def test_lapis_image_filename_with_a_style_folder_finds_the_flat_image(tmp_path):
    save_jpeg(tmp_path / "images" / "Monet_1.jpg")
    save_jpeg(tmp_path / "images" / "Klimt_3.jpg")
    csv = tmp_path / "LAPIS_individualratings_metaANDdemodata.csv"
    styled = ["Impressionism/Monet_1.jpg", "Art_Nouveau/Klimt_3.jpg", "Impressionism/Monet_1.jpg"]
    lapis_frame("image_filename", styled).to_csv(csv, index=False)
    table = load_ratings(csv).scores
    assert table.df["image"].tolist() == ["Monet_1.jpg", "Klimt_3.jpg", "Monet_1.jpg"]
    assert table.df["image_id"].tolist() == [5, 9, 5]
    csv.write_text(csv.read_text().replace("Art_Nouveau/Klimt_3.jpg", "Art_Nouveau/Gone.jpg"))
    with pytest.raises(UserError, match=r"line 3: image file not found: .*Art_Nouveau/Gone\.jpg"):
        load_ratings(csv)


# --- Pick-a-Pic ----------------------------------------------------------------------------------


def pickapic_shard(path: Path) -> list[bytes]:
    red, blue, green = jpeg_bytes((220, 0, 0)), jpeg_bytes((0, 0, 220)), jpeg_bytes((0, 200, 0))
    df = pd.DataFrame(
        {
            "are_different": [True, True, True, True],
            "best_image_uid": ["u0", "u3", "", "u6"],
            "caption": ["a red fox", "a blue sea", "a tie", "bad bytes"],
            "has_label": [True, True, True, True],
            "jpg_0": [red, blue, red, b"not an image at all"],
            "jpg_1": [blue, green, green, red],
            "label_0": [1.0, 0.0, 0.5, 1.0],
            "label_1": [0.0, 1.0, 0.5, 0.0],
            "model_0": ["sd-1.5", "sdxl", "sdxl", "sd-2.1"],
            "model_1": ["sdxl", "sd-1.5", "sd-2.1", "sdxl"],
            "ranking_id": [1, 2, 3, 4],
            "user_id": [17, 17, 42, 42],
        }
    )
    df.to_parquet(path, index=False)
    return [red, blue, green]


def test_pickapic_caches_inline_images_by_content_hash_and_keeps_ties(tmp_path):
    red, blue, green = pickapic_shard(tmp_path / "train-00000-of-00001.parquet")
    with pytest.warns(UserWarning, match=r"skipped 1 of 4 rows \(1 unreadable_image\)"):
        data = load_ratings(tmp_path, image_root=tmp_path / "cache", on_error="skip")
    pairs = data.pairs
    assert data.report.skipped == {"unreadable_image": 1}
    # user 42's only readable row is a tie: kept, so the user is not lost
    assert pairs.rater_ids == ["17", "42"]
    assert pairs.df["winner"].tolist() == ["a", "b", "tie"]
    assert pairs.b_preferred.tolist() == [0.0, 1.0, 0.5]  # what the Bradley-Terry loss reads
    h = {
        k: hashlib.sha256(v).hexdigest() + ".jpg"
        for k, v in [("r", red), ("b", blue), ("g", green)]
    }
    assert pairs.df["image_a"].tolist() == [h["r"], h["b"], h["r"]]
    assert pairs.df["image_b"].tolist() == [h["b"], h["g"], h["g"]]
    assert pairs.df["caption"].tolist() == ["a red fox", "a blue sea", "a tie"]
    assert "jpg_0" not in pairs.df.columns  # the bytes live in the cache, not the table
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(set(h.values()))
    assert (tmp_path / "cache" / h["g"]).read_bytes() == green
    stamp = (tmp_path / "cache" / h["r"]).stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_ratings(tmp_path, image_root=tmp_path / "cache", on_error="skip")
    assert (tmp_path / "cache" / h["r"]).stat().st_mtime_ns == stamp  # written once


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"label_0": float("nan"), "label_1": float("nan")},
            r"row 2: label_0 empty and label_1 empty are not a choice; expected 1 and 0",
        ),
        ({"label_0": 1.0, "label_1": 1.0}, r"row 2: label_0 1 and label_1 1 are not a choice"),
        ({"jpg_1": b""}, r"row 2: empty jpg_1; a choice needs two images"),
        ({"user_id": None}, r"row 2: empty user_id"),
        ({"jpg_1": "same"}, r"row 2: jpg_0 and jpg_1 hold the same image"),
    ],
)
def test_pickapic_bad_rows_are_named_in_the_shards_own_columns(tmp_path, row, message):
    shard = tmp_path / "train-00000-of-00001.parquet"
    pickapic_shard(shard)
    df = pd.read_parquet(shard).astype({"user_id": object}).iloc[:3]  # row 4's bytes are bad too
    for col, value in row.items():
        df.at[1, col] = df.at[1, "jpg_0"] if value == "same" else value
    df.to_parquet(shard, index=False)
    with pytest.raises(UserError, match=message) as e:
        load_ratings(shard, image_root=tmp_path / "cache")
    assert not any(w in str(e.value) for w in ("winner", "image_a", "image_b", "rater_id"))


def test_pickapic_bad_bytes_raise_before_anything_is_written(tmp_path):
    shard = tmp_path / "train-00000-of-00001.parquet"
    pickapic_shard(shard)
    with pytest.raises(
        UserError, match=r"train-00000-of-00001\.parquet row 4: jpg_0 is not image bytes"
    ):
        load_ratings(shard, image_root=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# --- HPDv2 ---------------------------------------------------------------------------------------


def write_hpdv2(root: Path, path_key: str = "file_path") -> Path:
    for i in range(5):
        save_jpeg(root / "train" / f"{i:08d}.jpg", (50 * i, 50, 50))
    records = [
        {
            "user_hash": "9f2c",
            "prompt": "a cat",
            path_key: ["00000000.jpg", "00000001.jpg"],
            "human_preference": [0, 1],
        },
        {
            "user_hash": "9f2c",
            "prompt": "a dog",
            path_key: ["00000002.jpg", "00000003.jpg", "00000004.jpg"],
            "human_preference": [0, 1, 0],
        },
        {
            "user_hash": "77ab",
            "prompt": "a bird",
            path_key: ["00000000.jpg", "00000004.jpg"],
            "human_preference": [1, 1],
        },
    ]
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("path_key", ["file_path", "image_path"])
def test_hpdv2_turns_each_record_into_preferred_vs_other_pairs(tmp_path, path_key):
    path = write_hpdv2(tmp_path, path_key)
    assert detect_format(tmp_path) == ("hpdv2", path)
    with pytest.warns(UserWarning, match="1 bad_preference"):
        data = load_ratings(tmp_path, on_error="skip")
    df = data.pairs.df
    assert df[["image_a", "image_b", "winner"]].values.tolist() == [
        ["00000000.jpg", "00000001.jpg", "b"],
        ["00000002.jpg", "00000003.jpg", "b"],  # image 3 preferred over each of the others
        ["00000003.jpg", "00000004.jpg", "a"],
    ]
    assert df["rater_id"].tolist() == ["9f2c"] * 3 and df["prompt"].tolist()[1] == "a dog"
    assert data.pairs.image_root == tmp_path / "train"
    assert data.report.skipped == {"bad_preference": 1}


def test_hpdv2_bad_record_and_missing_fields_are_named(tmp_path):
    path = write_hpdv2(tmp_path)
    with pytest.raises(UserError, match=r"train\.json record 3: file_path and human_preference"):
        load_ratings(path)
    path.write_text(json.dumps([{"prompt": "x", "file_path": ["a", "b"]}]))
    with pytest.raises(
        UserError, match=r"missing field\(s\) user_hash, human_preference for HPDv2"
    ):
        load_ratings(path, format="hpdv2")


def test_adapter_layouts_are_found_by_file_name(tmp_path, para):
    assert detect_format(para) == ("para", para / "annotation" / "PARA-Images.csv")
    with pytest.raises(UserError, match="found no ratings here"):
        detect_format(tmp_path / "PARA" / "imgs")
    with pytest.raises(UserError, match="score_range does not apply to hpdv2"):
        load_ratings(write_hpdv2(tmp_path / "hpd"), score_range=(0, 1))
