"""Host-side overhead in the trainer's hot loops, on the toy base (CPU).

On a GPU the host queues kernels ahead of the device until something makes it wait: `.item()`,
`.tolist()` or `bool()` of a device tensor, or a collective per parameter. On the CPU nothing
runs ahead, so this script counts those points (they become waits on a GPU) and times what is
pure Python: the walk over the UNet's modules that `unet_forward` did on every call.

    python benchmarks/host_overhead_toy.py [--cache-dir DIR] [--out FILE.json]

Run it on two checkouts (PYTHONPATH=...) to compare before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

from plural_diffusion.conditioning import _attached_tokens, unet_forward
from plural_diffusion.configs import CONFIGS
from plural_diffusion.ddpo import Trainer
from plural_diffusion.demo import DemoConfig, stage_rewards
from plural_diffusion.toyworld.prepare import prepare_toy
from plural_diffusion.train_config import TrainConfig
from reward_models.config import load_config


@contextlib.contextmanager
def count_host_syncs(counts: dict[str, int]):
    """Count calls of the Tensor methods that wait for the device on a GPU, by call site
    ("file:function"). torch.optim's `.item()` reads AdamW's step counter, a CPU tensor that
    never waits for a GPU."""
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__")}

    def counting(name, method):
        def wrapper(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            where = "/".join(Path(caller.filename).parts[-2:])
            key = f"{name} in {where}:{caller.name}"
            counts[key] = counts.get(key, 0) + 1
            return method(self, *args, **kwargs)

        return wrapper

    for name, method in originals.items():
        setattr(torch.Tensor, name, counting(name, method))
    try:
        yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def per_call_us(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="toy stage cache")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    demo = load_config(DemoConfig, CONFIGS / "demo-fast.yaml")
    cache = args.cache_dir or Path(tempfile.mkdtemp())
    assets = prepare_toy(demo.prepare, root=cache, progress=False)
    rewards = stage_rewards(demo, assets, cache)
    out_dir = tempfile.mkdtemp()
    cfg = load_config(
        TrainConfig,
        CONFIGS / "toy.yaml",
        [
            f"base={assets.base}",
            f"rewards={rewards}",
            f"out_dir={out_dir}",
            "method=ddpo",
            "tensorboard=false",
            "sampling.steps=10",
            "ddpo.sample_batch_size=12",
            "ddpo.sample_batches=1",
            "ddpo.train_batch_size=6",
            "ddpo.inner_epochs=1",
        ],
    )
    trainer = Trainer(cfg)
    unet, conditioner = trainer.unet, trainer.conditioner
    latents = torch.randn(12, 4, 8, 8)
    text = trainer.prompt_embeds[:1].expand(12, -1, -1)
    z = trainer.tastes[torch.arange(12) % len(trainer.tastes)]

    figures = {"unet_modules": sum(1 for _ in unet.modules())}
    figures["attached_tokens_us"] = per_call_us(lambda: _attached_tokens(unet), 2000)
    with torch.no_grad():
        figures["unet_forward_us"] = per_call_us(
            lambda: unet_forward(unet, conditioner, latents, 500, text, z), 50
        )
    trainer.train_epoch()  # warm-up
    counts: dict[str, int] = {}
    start = time.perf_counter()
    with count_host_syncs(counts):
        for _ in range(args.epochs):
            trainer.train_epoch()
    figures["ddpo_epoch_s"] = (time.perf_counter() - start) / args.epochs
    figures["host_syncs_per_epoch"] = {k: v / args.epochs for k, v in sorted(counts.items())}
    figures["params_with_grad"] = len(trainer.params)
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
