"""Run by tests/test_multiprocess.py under `torchrun --nproc_per_node 2` (gloo on the CPU)."""

import hashlib
import json
import sys

import torch

from plural_diffusion.configs import CONFIGS
from plural_diffusion.ddpo import Trainer
from plural_diffusion.train_config import TrainConfig
from reward_models.config import load_config


def main() -> None:
    out, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    cfg = load_config(TrainConfig, CONFIGS / "toy.yaml", [f"out_dir={out}", *overrides])
    trainer = Trainer(cfg)
    acc = trainer.accelerator
    history = trainer.fit(progress=False)
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


if __name__ == "__main__":
    main()
