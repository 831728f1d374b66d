"""Two processes (gloo on the CPU): LoRA gradients are averaged, so every rank holds the same
weights; advantage statistics are gathered over ranks; checkpoints are written once; a resumed
run replays the uninterrupted one on every rank; a NaN on one rank stops all of them."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(Path(__file__).with_name("_multiprocess_worker.py")),
        str(out),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def common(toy_assets, reward_run, method: str) -> list[str]:
    return [
        f"base={toy_assets.base}",
        f"rewards={reward_run}",
        f"method={method}",
        "save_every=1",
        "sampling.steps=4",
        "tensorboard=false",
        "draft.batch_size=3",
        "draft.steps_per_epoch=1",
        "ddpo.sample_batch_size=3",
        "ddpo.sample_batches=1",
        "ddpo.train_batch_size=3",
        "ddpo.stat_min_count=2",
    ]


@pytest.mark.slow  # ~35 s each: three two-process runs
@pytest.mark.parametrize("method", ["ddpo", "draft"])
def test_two_processes_stay_in_sync_and_resume_exactly(toy_assets, reward_run, tmp_path, method):
    out = tmp_path / "run"
    done = torchrun(out, *common(toy_assets, reward_run, method), "epochs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "mp_report.json").read_text())
    assert report["num_processes"] == 2
    assert report["digests"][0] == report["digests"][1]  # same LoRA on both ranks
    epochs = sorted(p.name for p in (out / "checkpoints").glob("epoch-*"))
    assert epochs == ["epoch-0001", "epoch-0002"]
    # toy.yaml selects each taste's expert after training: on every rank alike (same digests)
    assert (out / "checkpoints" / "selected" / "policy").is_dir()
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # logged once, not per rank
    if method == "ddpo":
        # both ranks track the same keys, each fed by the gathered rewards of both ranks
        assert report["tracker_keys"][0] == report["tracker_keys"][1]
        assert sum(report["rewards_seen"]) == 2 * 2 * 3  # epochs x ranks x images

    # stopped after epoch 1 and resumed: each rank restores its own random state (rank 1
    # loading rank 0's would draw rank 0's samples), so epoch 2 is the uninterrupted one's
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "epoch-0001", resumed / "checkpoints" / "epoch-0001")
    done = torchrun(resumed, *common(toy_assets, reward_run, method), "epochs=2", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((resumed / "mp_report.json").read_text())
    assert again["digests"] == report["digests"]
    straight = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    replayed = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert replayed[1]["reward_mean"] == straight[1]["reward_mean"]


def test_a_nan_reward_on_one_rank_stops_every_rank_with_the_one_line_error(
    toy_assets, reward_run, tmp_path
):
    out = tmp_path / "run"
    args = [*common(toy_assets, reward_run, "draft"), "epochs=3"]
    done = torchrun(out, *args, env={"PD_TEST_NAN_RANK": "1"})
    assert done.returncode != 0
    for rank in (0, 1):  # rank 0's rewards are finite, yet it stops too instead of waiting
        error = (out / f"error-rank{rank}.txt").read_text()
        assert error.startswith("non-finite reward at epoch 1;") and "\n" not in error
    # the checkpoint of epoch 1 is intact and no later one was started
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001"]
    assert (out / "checkpoints" / "epoch-0001" / "trainer_state.json").is_file()
