"""`reward-models social`: a vote of simulated raters over a folder of images, end to end."""

import json
import shutil

import numpy as np
import pytest
import torch

from reward_models.cli import main
from reward_models.features import extract_features
from reward_models.heads import load_head, read_head_metadata
from reward_models.metrics import pairwise_accuracy
from reward_models.social_choice import RULES
from reward_models.workflow import load_run


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr()


@pytest.fixture
def candidates(toy_assets, tmp_path):
    """Six toy-world images in a folder of their own."""
    folder = tmp_path / "candidates"
    folder.mkdir()
    for image in sorted((toy_assets.world / "images").glob("*.png"))[:6]:
        shutil.copy(image, folder / image.name)
    return folder


def test_social_ranks_the_candidates_writes_ranking_and_a_loadable_social_head(
    reward_run, candidates, tmp_path, capsys
):
    def social(out):
        argv = [
            "social",
            "--heads",
            str(reward_run),
            "--rule",
            "copeland",
            "--candidates",
            str(candidates),
            "--out",
            str(out),
            "--voters",
            "60",
            "--seed",
            "3",
        ]
        return run(argv, capsys)

    out = tmp_path / "social"
    code, printed = social(out)
    assert code == 0, printed.err
    assert "copeland over 60 simulated voters" in printed.out
    assert f"wrote {out / 'ranking.json'}" in printed.out

    ranking = json.loads((out / "ranking.json").read_text())
    names = [row["candidate"] for row in ranking["order"]]
    scores = [row["score"] for row in ranking["order"]]
    assert sorted(names) == sorted(p.name for p in candidates.iterdir())
    assert [row["place"] for row in ranking["order"]] == [1, 2, 3, 4, 5, 6]
    assert scores == sorted(scores, reverse=True)
    assert (ranking["rule"], ranking["n_voters"], ranking["seed"]) == ("copeland", 60, 3)
    assert ranking["components"] == len(ranking["component_shares"]) >= 1
    assert min(ranking["bic"], key=ranking["bic"].get) == str(ranking["components"])
    # Copeland puts a Condorcet winner first, with 5 wins of 5
    winner = ranking["condorcet_winner"]
    assert winner is None or (winner == names[0] and scores[0] == 5)
    assert f"Condorcet winner: {winner or 'none'}" in printed.out

    # the social head loads like any head and reproduces the social order on the candidates
    head = load_head(out / "head")
    meta = read_head_metadata(out / "head")["social"]
    assert (meta["rule"], meta["n_voters"], meta["seed"]) == ("copeland", 60, 3)
    clip = load_run(reward_run).cfg.clip
    files, features, _ = extract_features([candidates], clip.model, None, clip.cache_dir)
    with torch.no_grad():
        learned = head.score(features, None).numpy()
    social_scores = np.array([scores[names.index(f.name)] for f in files])
    assert pairwise_accuracy(learned, social_scores) >= 0.9

    # one seed, one outcome
    assert social(tmp_path / "again")[0] == 0
    assert json.loads((tmp_path / "again" / "ranking.json").read_text()) == ranking


def test_an_unknown_rule_is_one_line_listing_the_valid_rules(tmp_path, capsys):
    argv = ["social", "--heads", str(tmp_path), "--rule", "bordaa", "--candidates", str(tmp_path)]
    code, printed = run(argv, capsys)
    assert code == 2 and printed.err.count("\n") == 1
    assert "unknown aggregation rule 'bordaa'; valid rules: " + ", ".join(RULES) in printed.err


@pytest.mark.parametrize(
    "what, message",
    [
        ("no-candidates", "no such directory of candidate images"),
        ("no-run", "is not a reward-models run"),
    ],
)
def test_missing_folders_are_one_line_errors(what, message, tmp_path, capsys):
    heads, folder = tmp_path / "run", tmp_path / "images"
    (heads if what == "no-candidates" else folder).mkdir()
    code, printed = run(["social", "--heads", str(heads), "--candidates", str(folder)], capsys)
    assert code == 2 and printed.err.count("\n") == 1
    assert message in printed.err


def test_a_folder_without_images_is_a_one_line_error(reward_run, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no pictures here")
    argv = [
        "social",
        "--heads",
        str(reward_run),
        "--candidates",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
    ]
    code, printed = run(argv, capsys)
    assert code == 2 and printed.err.count("\n") == 1
    assert "no images found" in printed.err
    assert not (tmp_path / "out").exists()
