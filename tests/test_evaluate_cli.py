"""`plural-diffusion evaluate`: several policies on the same prompts and seeds, measured per
cluster against the mean policy, with the over-optimisation curve of a run's checkpoints, written
as metrics.json and a self-contained report.html."""

import json

import pytest

from plural_diffusion.cli import main as pd_main
from plural_diffusion.configs import CONFIGS
from plural_diffusion.ddpo import train
from plural_diffusion.train_config import TrainConfig
from reward_models.config import load_config


def tiny_run(toy_assets, reward_run, out, objective, epochs):
    overrides = [
        f"base={toy_assets.base}",
        f"rewards={reward_run}",
        f"out_dir={out}",
        f"objective={objective}",
        f"epochs={epochs}",
        "save_every=1",
        "lr=0.01",
        "sampling.steps=4",
        "draft.batch_size=6",
        "draft.steps_per_epoch=1",
        "tensorboard=false",
    ]
    cfg = load_config(TrainConfig, CONFIGS / "toy.yaml", overrides)
    train(cfg, progress=False)
    return out / "checkpoints"


@pytest.fixture(scope="module")
def runs(toy_assets, reward_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        "mean": tiny_run(toy_assets, reward_run, root / "mean", "mean", 1),
        "matched": tiny_run(toy_assets, reward_run, root / "matched", "matched", 2),
    }


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        pd_main(argv)
    return e.value.code, capsys.readouterr()


def test_evaluate_writes_per_cluster_metrics_win_rates_curve_and_report(
    runs, reward_run, tmp_path, capsys
):
    out = tmp_path / "eval"
    argv = [
        "evaluate",
        "--rewards",
        str(reward_run),  # base, and the sampler: those the checkpoints were trained with
        "--policy",
        f"mean={runs['mean'] / 'epoch-0001'}",
        "--policy",
        f"matched={runs['matched'] / 'epoch-0002'}",
        "--checkpoints",
        f"matched={runs['matched']}",
        "--prompt",
        "an image of one circle",
        "--seeds",
        "2",
        "--curve-seeds",
        "1",
        "--lottery",
        "maxmin=matched",
        "--lottery-seeds",
        "2",
        "--out",
        str(out),
    ]
    code, printed = run(argv, capsys)
    assert code == 0, printed.err
    assert "win rate vs mean" in printed.out and "report: " in printed.out
    assert "maxmin: the egalitarian lottery over matched's clusters" in printed.out

    m = json.loads((out / "metrics.json").read_text())
    names = m["clusters"]["names"]
    assert names == ["noir", "sunny", "vivid"] and abs(sum(m["clusters"]["shares"]) - 1) < 1e-3
    # the base model is always included; the lottery is a taste-blind policy of matched's images
    assert set(m["policies"]) == {"base", "mean", "matched", "maxmin"}
    lottery = m["policies"]["maxmin"]
    assert lottery["tastes"] == ["none"] and lottery["lottery"]["of"] == "matched"
    assert len(lottery["lottery"]["made_for"]) == 2  # one prompt x two seeds
    fitted = json.loads((out / "lottery-maxmin.json").read_text())
    assert len(fitted["seeds"]) == 2 and min(fitted["seeds"]) > 1  # not the evaluation's seeds
    assert fitted["shares"] == list(lottery["lottery"]["shares"].values())
    for name, p in m["policies"].items():
        assert set(p["reward_per_cluster"]) == set(p["gold_per_cluster"]) == set(names), name
        assert p["worst_cluster_gold"] == min(p["gold_per_cluster"].values())
        assert p["vendi"] >= 1.0 and set(p["win_rate"]["gold"]) == set(names)
    assert m["policies"]["matched"]["tastes"] == names  # one image set per cluster
    assert m["policies"]["mean"]["tastes"] == ["none"]
    # the baseline against itself: every image ties
    assert set(m["policies"]["mean"]["win_rate"]["gold"].values()) == {0.5}
    assert len(m["cross_taste_gold"]) == 3 and m["cross_taste_policy"] == "matched"
    curve = m["overoptimisation"]["matched"]
    assert curve["epochs"] == [0, 1, 2]
    assert all(len(v) == 3 for v in curve["gold_per_cluster"].values())
    assert len(curve["vendi_within_taste"]) == 3 and min(curve["vendi_within_taste"]) > 1.0 - 1e-9
    assert m["eval"]["seeds"] == [0, 1] and curve["n_seeds"] == 1  # the curve: the first seed
    # every policy samples as the policies were trained (4 steps), the base model included
    assert {p["sampling"]["steps"] for p in m["policies"].values()} == {4}
    assert m["policies"]["matched"]["sampling"]["source"]["steps"] == "checkpoint"
    assert m["policies"]["base"]["sampling"]["source"]["steps"] == (
        f"checkpoint {runs['mean'] / 'epoch-0001' / 'policy'}"
    )

    page = (out / "report.html").read_text()
    assert "Matched vs mean, per cluster" in page and page.count("data:image/png;base64,") >= 7


@pytest.mark.parametrize(
    "args, message",
    [
        (["--policy", "matched"], "expected NAME=DIR"),
        (["--policy", "base=/x"], "the name 'base' is always evaluated"),
        (["--policy", "m=/no/such/ckpt"], "/no/such/ckpt: checkpoint directory not found"),
        (["--checkpoints", "m=/no/such/run"], "/no/such/run: checkpoints folder not found"),
        (["--baseline", "nobody"], "baseline policy 'nobody' is not evaluated"),
        (["--lottery", "maxmin"], "expected NAME=POLICY, e.g. --lottery maxmin=matched"),
        (["--lottery", "maxmin=nobody"], "'nobody' is not a --policy of this evaluation"),
    ],
)
def test_bad_evaluate_arguments_are_one_line_errors(
    toy_assets, reward_run, tmp_path, capsys, args, message
):
    common = ["evaluate", "--base", str(toy_assets.base), "--rewards", str(reward_run)]
    argv = [*common, "--seeds", "1", "--steps", "2", "--out", str(tmp_path), *args]
    code, printed = run(argv, capsys)
    assert code == 2
    assert message in printed.err
    assert printed.err.count("\n") == 1
