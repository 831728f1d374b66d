"""Two processes (gloo on the CPU): LoRA gradients are averaged, so every rank holds the same
weights; advantage statistics are gathered over ranks; checkpoints are written once."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["ddpo", "draft"])
def test_two_processes_stay_in_sync(toy_assets, reward_run, tmp_path, method):
    out = tmp_path / "run"
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
        f"base={toy_assets.base}",
        f"rewards={reward_run}",
        f"method={method}",
        "epochs=2",
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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "mp_report.json").read_text())
    assert report["num_processes"] == 2
    assert report["digests"][0] == report["digests"][1]  # same LoRA on both ranks
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # logged once, not per rank
    if method == "ddpo":
        # both ranks track the same keys, each fed by the gathered rewards of both ranks
        assert report["tracker_keys"][0] == report["tracker_keys"][1]
        assert sum(report["rewards_seen"]) == 2 * 2 * 3  # epochs x ranks x images
