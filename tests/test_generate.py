"""`plural-diffusion generate`: a PNG per (taste, prompt, seed) with its provenance in the PNG
metadata, a labelled grid per prompt, tastes from clusters, raters, a new user's ratings and
interpolation, the sampler the policy was trained with unless overridden, and one-line errors for
unknown ids or a taste the policy cannot take."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from plural_diffusion.cli import main as pd_main
from plural_diffusion.configs import CONFIGS
from plural_diffusion.ddpo import train
from plural_diffusion.train_config import TrainConfig
from reward_models.config import load_config

PROMPT = "an image of one circle"
NEGATIVE = "a bright image"  # the negative prompt the policy is trained with


@pytest.fixture(scope="module")
def matched_run(toy_assets, reward_run, tmp_path_factory):
    """A taste-conditioned policy trained for two tiny epochs, a checkpoint after each."""
    out = tmp_path_factory.mktemp("matched")
    overrides = [
        f"base={toy_assets.base}",
        f"rewards={reward_run}",
        f"out_dir={out}",
        "objective=matched",
        "epochs=2",
        "save_every=1",
        "lr=0.01",
        "sampling.steps=4",
        "sampling.guidance_scale=3.0",
        f"negative_prompt={NEGATIVE}",
        "draft.batch_size=6",
        "draft.steps_per_epoch=1",
        "tensorboard=false",
    ]
    cfg = load_config(TrainConfig, CONFIGS / "toy.yaml", overrides)
    train(cfg, progress=False)
    return out


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        pd_main(argv)
    return e.value.code, capsys.readouterr()


def generate(args, out, capsys):
    code, printed = run(["generate", "--prompt", PROMPT, "--out", str(out), *args], capsys)
    assert code == 0, printed.err
    return json.loads((out / "manifest.json").read_text())


def test_every_taste_and_seed_gets_a_png_with_provenance_and_the_prompt_a_grid(
    matched_run, tmp_path, capsys
):
    checkpoint = matched_run / "checkpoints" / "epoch-0002"
    tastes = ["cluster:noir", "cluster:2", "rater:rater_000", "mean"]
    args = ["--checkpoint", str(checkpoint), "--seed-list", "3,5"]
    manifest = generate(
        [*args, *[a for t in tastes for a in ("--taste", t)]], tmp_path / "a", capsys
    )

    assert [t["label"] for t in manifest["tastes"]] == ["noir", "vivid", "rater rater_000", "mean"]
    files = manifest["prompts"][0]["images"]
    assert len(files) == 4 * 2  # tastes x seeds, one prompt
    vivid = next(f for f in files if f["taste"] == "vivid" and f["seed"] == 5)
    png = Image.open(tmp_path / "a" / vivid["file"])
    assert png.size == (32, 32)
    assert png.text["prompt"] == PROMPT and png.text["seed"] == "5"
    assert png.text["taste"] == "vivid" and png.text["taste_spec"] == "cluster:2"
    assert png.text["checkpoint"] == str(checkpoint / "policy")
    assert len(json.loads(png.text["taste_vector"])) == 8  # the reward run's taste dimension
    assert json.loads(Image.open(tmp_path / "a" / files[-1]["file"]).text["taste_vector"]) is None
    grid = tmp_path / "a" / manifest["prompts"][0]["grid"]
    assert Image.open(grid).size[0] > 2 * 32  # labelled rows x seed columns

    # an image is fixed by (taste, prompt, seed): alone in its batch it comes out the same, up
    # to float rounding (CPU kernels sum in another order for another batch size)
    again = generate(
        [*args[:2], "--seed-list", "5", "--taste", "cluster:vivid"], tmp_path / "b", capsys
    )
    alone = Image.open(tmp_path / "b" / again["prompts"][0]["images"][0]["file"])
    difference = np.abs(np.asarray(alone, dtype=int) - np.asarray(png, dtype=int))
    assert difference.max() <= 2 and (difference > 0).mean() < 0.01, difference.max()


def test_dtype_bf16_runs_the_frozen_models_in_bfloat16_and_draws_nearly_the_same_images(
    matched_run, tmp_path, capsys
):
    args = ["--checkpoint", str(matched_run / "checkpoints" / "epoch-0002"), "--seed-list", "3"]
    args += ["--taste", "cluster:vivid"]
    full = generate(args, tmp_path / "fp32", capsys)
    half = generate([*args, "--dtype", "bf16"], tmp_path / "bf16", capsys)
    assert (full["dtype"], half["dtype"]) == ("float32", "bfloat16")
    a, b = (
        np.asarray(Image.open(tmp_path / d / m["prompts"][0]["images"][0]["file"]), dtype=int)
        for d, m in (("fp32", full), ("bf16", half))
    )
    assert np.abs(a - b).mean() < 8, np.abs(a - b).mean()  # bf16 rounding, the same image


def test_compile_compiles_the_policys_unet_in_place(matched_run, tmp_path, capsys, monkeypatch):
    """`--compile` torch.compiles the UNet the sampler calls (measured on a GPU, where it pays:
    README, "Measured on an H200"); here the compile call is recorded, not run, as compiling
    takes minutes on a CPU."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module: compiled.append(module))
    args = ["--checkpoint", str(matched_run / "checkpoints" / "epoch-0002"), "--seed-list", "3"]
    generate([*args, "--taste", "cluster:vivid"], tmp_path / "plain", capsys)
    assert compiled == []
    generate([*args, "--taste", "cluster:vivid", "--compile"], tmp_path / "compiled", capsys)
    assert [type(m).__name__ for m in compiled] == ["UNet2DConditionModel"]


def test_a_new_users_ratings_and_an_interpolation_become_tastes(
    matched_run, reward_run, tmp_path, capsys
):
    world = json.loads((reward_run / "config.json").read_text())["data"]["path"]
    scores = pd.read_csv(f"{world}/scores.csv")
    mine = scores[scores.rater_id == "rater_036"].head(10)
    table = tmp_path / "my_ratings.csv"
    pd.DataFrame({"image": [f"{world}/{i}" for i in mine.image], "score": mine.score}).to_csv(
        table, index=False
    )
    args = [
        "--checkpoint",
        str(matched_run / "checkpoints" / "epoch-0001"),
        "--seeds",
        "1",
        "--ratings",
        str(table),
        "--taste",
        f"nearest:{table}",
        "--interpolate",
        "cluster:noir",
        "cluster:sunny",
        "--interpolate-steps",
        "3",
    ]
    manifest = generate(args, tmp_path / "out", capsys)
    labels = [t["label"] for t in manifest["tastes"]]
    # --taste comes before --ratings; rater_036 is a sunny rater
    assert labels[0].startswith("user my_ratings.csv -> sunny (") and labels[0].endswith("%)")
    assert labels[1:] == ["user my_ratings.csv", "noir", "0.50 noir + 0.50 sunny", "sunny"]
    z = {t["label"]: torch.tensor(t["z"]) for t in manifest["tastes"]}
    torch.testing.assert_close(z["0.50 noir + 0.50 sunny"], (z["noir"] + z["sunny"]) / 2)
    torch.testing.assert_close(z[labels[0]], z["sunny"])  # the cluster's own taste
    assert len(manifest["prompts"][0]["images"]) == 5


def test_a_lottery_makes_each_image_for_the_cluster_it_draws(matched_run, tmp_path, capsys):
    checkpoint = str(matched_run / "checkpoints" / "epoch-0002")
    seeds = ["--checkpoint", checkpoint, "--seed-list", "3,5,7,9"]
    lottery = tmp_path / "lottery.json"
    lottery.write_text(json.dumps({"clusters": ["noir", "sunny", "vivid"], "shares": [1, 1, 0]}))
    manifest = generate([*seeds, "--lottery", str(lottery)], tmp_path / "l", capsys)
    assert [t["label"] for t in manifest["tastes"]] == ["lottery"]
    files = manifest["prompts"][0]["images"]
    assert sorted(f["made_for"] for f in files) == ["noir", "noir", "sunny", "sunny"]
    # each image is the one the policy makes for its drawn cluster on its seed
    per_taste = generate(
        [*seeds, "--taste", "cluster:noir", "--taste", "cluster:sunny"], tmp_path / "t", capsys
    )
    made = {(f["taste"], f["seed"]): f["file"] for f in per_taste["prompts"][0]["images"]}
    for f in files:
        png = Image.open(tmp_path / "l" / f["file"])
        assert png.text["made_for"] == f["made_for"] and png.text["taste"] == "lottery"
        own = Image.open(tmp_path / "t" / made[(f["made_for"], f["seed"])])
        difference = np.abs(np.asarray(own, dtype=int) - np.asarray(png, dtype=int))
        assert difference.max() <= 2 and (difference > 0).mean() < 0.01, f
    # a lottery over other clusters is refused in one line
    lottery.write_text(json.dumps({"clusters": ["a", "b"], "shares": [1, 1]}))
    code, printed = run(
        [
            "generate",
            "--prompt",
            PROMPT,
            "--out",
            str(tmp_path / "x"),
            *seeds,
            "--lottery",
            str(lottery),
        ],
        capsys,
    )
    assert code == 2 and "not a lottery over this reward run's clusters" in printed.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--taste", "cluster:nope"], "unknown cluster 'nope'; known: noir, sunny, vivid"),
        (["--taste", "rater:nobody"], "unknown rater 'nobody'; e.g. rater_000, rater_001"),
        (
            ["--taste", "sunny"],
            "use cluster:NAME_OR_INDEX, rater:ID, ratings:FILE, nearest:FILE or mean",
        ),
        (["--no-checkpoint", "--taste", "cluster:noir"], "the base model has no taste conditioner"),
        (["--checkpoint", "/no/such/run"], "/no/such/run: checkpoint directory not found"),
        (["--ratings", "/no/ratings.csv"], "/no/ratings.csv: file not found"),
        (["--eta", "1.5"], "--eta 1.5: must be in [0, 1]"),
        (["--steps", "0"], "--steps 0: must be >= 1"),
        (["--dtype", "fp16"], "--dtype fp16 runs on a CUDA GPU (--device cpu); use --dtype bf16"),
        (["--lottery", "/no/lottery.json"], "/no/lottery.json: lottery file not found"),
        (["--lottery", "/x.json", "--taste", "mean"], "drop --taste, --ratings and --interpolate"),
        (
            ["--no-checkpoint", "--lottery", "/x.json"],
            "--lottery draws from a taste-matched policy",
        ),
    ],
)
def test_bad_tastes_and_paths_are_one_line_errors(
    matched_run, toy_assets, reward_run, tmp_path, capsys, args, message
):
    common = [
        "generate",
        "--base",
        str(toy_assets.base),
        "--rewards",
        str(reward_run),
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path),
    ]
    if args[0] == "--no-checkpoint":
        args = args[1:]
    elif args[0] != "--checkpoint":
        common += ["--checkpoint", str(matched_run / "checkpoints" / "epoch-0001")]
    code, printed = run([*common, *args], capsys)
    assert code == 2
    assert message in printed.err
    assert printed.err.count("\n") == 1 and "Traceback" not in printed.err


def test_the_trained_sampler_is_used_unless_overridden_and_the_outputs_say_which(
    matched_run, tmp_path, capsys
):
    args = ["--checkpoint", str(matched_run / "checkpoints" / "epoch-0002"), "--seeds", "1"]
    trained = generate([*args, "--taste", "cluster:noir"], tmp_path / "trained", capsys)
    assert trained["sampling"] == {
        "steps": 4,
        "guidance": 3.0,
        "eta": 1.0,
        "stochastic_steps": 0,
        "negative_prompt": NEGATIVE,
        "source": dict.fromkeys(
            ["steps", "guidance", "eta", "stochastic_steps", "negative_prompt"], "checkpoint"
        ),
    }
    png = Image.open(tmp_path / "trained" / trained["prompts"][0]["images"][0]["file"])
    assert (png.text["steps"], png.text["guidance"], png.text["negative_prompt"]) == (
        "4",
        "3.0",
        NEGATIVE,
    )
    assert json.loads(png.text["sampling_source"])["negative_prompt"] == "checkpoint"

    overridden = generate(
        [*args, "--taste", "cluster:noir", "--steps", "2", "--negative-prompt", ""],
        tmp_path / "user",
        capsys,
    )
    sampling = overridden["sampling"]
    assert (sampling["steps"], sampling["guidance"], sampling["negative_prompt"]) == (2, 3.0, "")
    assert sampling["source"] == {
        "steps": "user",
        "guidance": "checkpoint",
        "eta": "checkpoint",
        "stochastic_steps": "checkpoint",
        "negative_prompt": "user",
    }
    other = Image.open(tmp_path / "user" / overridden["prompts"][0]["images"][0]["file"])
    assert np.abs(np.asarray(other, dtype=int) - np.asarray(png, dtype=int)).max() > 10


def test_the_base_model_has_no_trained_sampler_and_says_so(toy_assets, tmp_path, capsys):
    manifest = generate(
        ["--base", str(toy_assets.base), "--seeds", "1", "--steps", "3"], tmp_path, capsys
    )
    assert manifest["checkpoint"] == "none (base model)"
    assert manifest["sampling"]["steps"] == 3 and manifest["sampling"]["guidance"] == 4.0
    assert manifest["sampling"]["source"] == {
        "steps": "user",
        "guidance": "default",
        "eta": "default",
        "stochastic_steps": "default",
        "negative_prompt": "default",
    }
