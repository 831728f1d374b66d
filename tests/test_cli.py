"""Command lines: user mistakes are one line on stderr and exit status 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from plural_diffusion.cli import main as pd_main
from reward_models.cli import main as rm_main


def run(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["config", "demo", "eval.images_per_prompt=many"], "config key 'eval.images_per_prompt'"),
        (["config", "train", "lora.rnak=4"], "unknown config key 'lora.rnak'"),
        (["train", "base=/nonexistent/sd", "rewards=/nonexistent/run"], "/nonexistent"),
        (["demo", "--config", "/no/such.yaml"], "config file /no/such.yaml not found"),
    ],
)
def test_plural_diffusion_user_errors(argv, message, capsys):
    code, out = run(pd_main, argv, capsys)
    assert code == 2
    assert message in out.err
    assert out.err.count("\n") == 1 and "Traceback" not in out.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "data.path=/no/ratings.csv", "clip.model=toy"], "/no/ratings.csv: no such file"),
        (["eval", "--run", "/no/run"], "is not a reward-models run"),
        (["train", "split.test_images=lots"], "config key 'split.test_images': expected a number"),
        (["inspect", "/no/ratings.csv"], "/no/ratings.csv: no such file or folder"),
        (["inspect", ".", "--format", "csvish"], "unknown format 'csvish'; use one of auto,"),
    ],
)
def test_reward_models_user_errors(argv, message, capsys):
    code, out = run(rm_main, argv, capsys)
    assert code == 2
    assert message in out.err
    assert out.err.count("\n") == 1


def test_config_command_prints_the_resolved_config(capsys):
    code, out = run(pd_main, ["config", "train", "epochs=7", "lora.rank=2"], capsys)
    assert code == 0
    assert "epochs: 7" in out.out and "rank: 2" in out.out


@pytest.mark.parametrize("script", ["plural-diffusion", "reward-models"])
def test_console_scripts_are_installed(script):
    # the entry point pip installed beside this interpreter, not `python -m`
    path = Path(sys.executable).parent / script
    assert path.is_file(), f"{path} missing: install the package (pip install -e .)"
    done = subprocess.run([str(path), "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script} ")


def test_toy_world_command_writes_tables(tmp_path, capsys):
    code, out = run(
        pd_main,
        [
            "toy",
            "world",
            "--out",
            str(tmp_path / "w"),
            "n_images=30",
            "n_raters=6",
            "scores_per_rater=5",
            "pairs_per_rater=5",
        ],
        capsys,
    )
    assert code == 0 and "wrote 30 images rated by 6 raters" in out.out
    assert (tmp_path / "w" / "scores.csv").is_file()


def test_inspect_summarises_what_a_load_read_before_training(tmp_path, capsys):
    for name in ("x.png", "y.png", "z.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    pd.DataFrame(
        {
            "image": ["x.png", "y.png", "z.png", "x.png", "gone.png"],
            "rater_id": ["r1", "r1", "r1", "r2", "r2"],
            "score": [2, 7, "NaN", 5, 4],
        }
    ).to_csv(tmp_path / "scores.csv", index=False)
    pd.DataFrame(
        {
            "image_a": ["x.png", "x.png"],
            "image_b": ["y.png", "z.png"],
            "rater_id": ["r2", "r3"],
            "winner": ["a", "tie"],
        }
    ).to_csv(tmp_path / "pairs.csv", index=False)
    code, out = run(rm_main, ["inspect", str(tmp_path)], capsys)
    assert code == 0
    lines = [" ".join(line.split()) for line in out.out.splitlines()]
    assert lines[0] == f"{tmp_path} (tables)"
    assert lines[1:10] == [
        "raters 3",
        "images 3",
        "ratings per rater min 1, median 2, max 2",  # r1: 2 scores, r2: 1 score + 1 pair, r3: 1
        "scores 3 (from 2 to 7)",
        "pairs 2",
        "ties 1",
        "rows read 7",
        "rows kept 5",
        "skipped rows 1 missing_image, 1 nan_score",
    ]
