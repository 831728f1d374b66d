"""Few-shot taste inference: a rater's ratings on images the heads never trained on give a taste
near their own cluster's centroid, without retraining; bad ratings files are one-line errors."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from reward_models.errors import UserError
from reward_models.features import load_clip
from reward_models.personalize import TastePrior, fit_taste, read_user_ratings, taste_from_ratings
from reward_models.workflow import load_run


def held_out_ratings(reward_run, rater_id):
    """The rater's scores on the run's held-out images (never seen in training), as a table."""
    run_dir = Path(reward_run)
    world = Path(load_run(run_dir).cfg.data.path)
    test_images = set(json.loads((run_dir / "split.json").read_text())["test_images"])
    scores = pd.read_csv(world / "scores.csv")
    rows = scores[(scores.rater_id == rater_id) & scores.image.isin(test_images)]
    return world, rows


def test_held_out_ratings_recover_a_taste_nearest_the_raters_own_cluster(reward_run):
    run = load_run(reward_run)
    world = Path(run.cfg.data.path)
    gold_cluster = pd.read_csv(world / "raters.csv").set_index("rater_id")["cluster"]
    encoder = load_clip(run.cfg.clip.model, run.cfg.clip.pretrained)
    centroids, names = run.clusters.centroids, run.clusters.names
    prior = TastePrior.from_head(run.rater)
    # With no ratings the best guess is the prior mean, which sits nearest the majority cluster:
    # it would be wrong for every sunny and vivid rater.
    assert names[int((centroids - prior.mean).norm(dim=1).argmin())] == "noir"

    correct = {}
    for cluster in names:
        for rater_id in gold_cluster[gold_cluster == cluster].index[:3]:
            _, rows = held_out_ratings(reward_run, rater_id)
            assert 8 <= len(rows) <= 20  # a handful of ratings: 9 to 15 for these raters
            features = encoder.encode_images([world / i for i in rows.image], progress=False)
            scores = torch.tensor(rows.score.to_numpy(), dtype=torch.float32)
            fit = fit_taste(run.rater, features, scores, prior, starts=centroids)
            distance = (centroids - fit.z).norm(dim=1)  # to each cluster's centroid
            correct.setdefault(cluster, []).append(names[int(distance.argmin())] == cluster)
            assert torch.isfinite(fit.z_sd).all() and fit.scale > 0
    # measured: 8 of 9 (noir 3/3, sunny 3/3, vivid 2/3; rater_056's taste lands between
    # clusters), where the prior alone gets 3 of 9
    assert all(sum(hits) >= 2 for hits in correct.values()), correct
    assert sum(sum(hits) for hits in correct.values()) >= 7, correct


def test_taste_from_a_ratings_file_matches_the_fit_on_its_features(reward_run, tmp_path):
    world, rows = held_out_ratings(reward_run, "rater_036")  # a sunny rater
    table = tmp_path / "my_ratings.csv"
    pd.DataFrame({"image": [str(world / i) for i in rows.image], "score": rows.score}).to_csv(
        table, index=False
    )
    run = load_run(reward_run)
    fit = taste_from_ratings(run, table)
    distance = (run.clusters.centroids - fit.z).norm(dim=1)
    assert run.clusters.names[int(distance.argmin())] == "sunny"
    assert fit.n_ratings == len(rows)


def write_table(tmp_path, text, image=True):
    if image:
        from PIL import Image

        Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
        Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    path = tmp_path / "ratings.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("image,rating\na.png,3\nb.png,4\n", "missing column(s) score"),
        ("image,score\na.png,3\nc.png,4\n", "c.png"),
        ("image,score\na.png,high\nb.png,4\n", "'high' is not a number"),
        ("image,score\na.png,3\n", "a taste needs at least 2"),
        ("image,score,rater_id\na.png,3,u1\nb.png,4,u2\n", "one user's ratings per file"),
    ],
)
def test_bad_ratings_files_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        read_user_ratings(write_table(tmp_path, text))
    assert "\n" not in str(e.value)


def test_a_good_ratings_file_reads_paths_relative_to_its_folder(tmp_path):
    images, scores = read_user_ratings(write_table(tmp_path, "image,score\na.png,3\nb.png,7.5\n"))
    assert images == [tmp_path / "a.png", tmp_path / "b.png"]
    assert scores.tolist() == [3.0, 7.5]
