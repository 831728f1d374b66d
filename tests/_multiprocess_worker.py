"""Run by tests/test_multiprocess.py under `torchrun --nproc_per_node 2` (gloo on the CPU).

Arguments: OUT_DIR [--resume] key=value...; with PD_TEST_NAN_RANK=r set, rank r's rewards turn
NaN from epoch 1 on, and every rank writes the error it stopped with to OUT_DIR/error-rank{k}.txt.
"""

import hashlib
import json
import os
import sys

import torch

from plural_diffusion.configs import CONFIGS
from plural_diffusion.ddpo import Trainer
from plural_diffusion.train_config import TrainConfig
from reward_models.config import load_config
from reward_models.errors import UserError


def nan_from_epoch_one(trainer: Trainer) -> None:
    reward = trainer.rewards.reward

    def poisoned(images, *args, **kwargs):
        r = reward(images, *args, **kwargs)
        return torch.full_like(r, float("nan")) if trainer.epoch >= 1 else r

    trainer.rewards.reward = poisoned


def main() -> None:
    out, *overrides = sys.argv[1:]
    resume = "--resume" in overrides
    overrides = [o for o in overrides if o != "--resume"]
    torch.set_num_threads(1)
    cfg = load_config(TrainConfig, CONFIGS / "toy.yaml", [f"out_dir={out}", *overrides])
    trainer = Trainer(cfg)
    acc = trainer.accelerator
    if os.environ.get("PD_TEST_NAN_RANK") == str(acc.process_index):
        nan_from_epoch_one(trainer)
    try:
        history = trainer.fit(resume=resume, progress=False)
    except UserError as e:
        (trainer.out_dir / f"error-rank{acc.process_index}.txt").write_text(str(e))
        trainer.close()
        raise
    lora = torch.cat([p.detach().flatten() for p in trainer.params])
    digest = hashlib.sha256(lora.numpy().tobytes()).hexdigest()
    digests = [None] * acc.num_processes
    torch.distributed.all_gather_object(digests, digest)
    keys = [None] * acc.num_processes
    torch.distributed.all_gather_object(keys, sorted(trainer.tracker.history))
    if acc.is_main_process:
        report = {
            "num_processes": acc.num_processes,
            "digests": digests,
            "tracker_keys": keys,
            "rewards_seen": [len(v) for v in trainer.tracker.history.values()],
            "epochs_logged": len(history),
        }
        (trainer.out_dir / "mp_report.json").write_text(json.dumps(report))
    acc.wait_for_everyone()
    trainer.close()  # as `train` does: a rank left to exit inside its group can abort


if __name__ == "__main__":
    main()
