"""Benchmark: sample efficiency of DDPO vs reward backpropagation (DRaFT-K) on the toy world.

Trains the taste-matched policy with each method on the default toy stages (cached by
`plural-diffusion toy prepare`) and records, per epoch, the samples seen and the gold utility of
the images generated for each cluster (the training log's `per_taste[*].gold`). Results go to
benchmarks/results/trainer_methods_toy.json and a plot next to it.

    python benchmarks/trainer_methods_toy.py [--epochs 15] [key=value overrides for both runs]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from plural_diffusion.cache import cache_root
from plural_diffusion.configs import CONFIGS
from plural_diffusion.ddpo import train
from plural_diffusion.demo import DemoConfig, gold_in_head_order, stage_rewards
from plural_diffusion.rewards import TasteRewards
from plural_diffusion.toyworld.prepare import prepare_toy
from plural_diffusion.toyworld.ratings import load_world
from plural_diffusion.train_config import TrainConfig
from reward_models.config import load_config

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/trainer_methods_toy"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)

    demo = load_config(DemoConfig, CONFIGS / "demo.yaml")
    assets = prepare_toy(demo.prepare)
    reward_run = stage_rewards(demo, assets, cache_root())
    world = load_world(assets.world)
    gold_fn = gold_in_head_order(world, TasteRewards(str(reward_run)).cluster_names)

    results = {}
    for method in ("draft", "ddpo"):
        cfg = load_config(
            TrainConfig,
            CONFIGS / "toy.yaml",
            [
                f"base={assets.base}",
                f"rewards={reward_run}",
                "objective=matched",
                f"method={method}",
                f"epochs={args.epochs}",
                f"save_every={args.epochs}",
                f"out_dir={args.out / method}",
                *args.overrides,
            ],
        )
        per_epoch = (
            cfg.draft.batch_size * cfg.draft.steps_per_epoch
            if method == "draft"
            else cfg.ddpo.sample_batch_size * cfg.ddpo.sample_batches
        )
        t0 = time.perf_counter()
        train(cfg, gold_fn=gold_fn, progress=True)
        seconds = time.perf_counter() - t0
        log = [json.loads(x) for x in (args.out / method / "log.jsonl").read_text().splitlines()]
        results[method] = {
            "samples_per_epoch": per_epoch,
            "seconds": round(seconds, 1),
            "gold_per_epoch": {
                name: [round(e["per_taste"][name]["gold"], 4) for e in log]
                for name in log[0]["per_taste"]
            },
        }
    results["torch_threads"] = 1
    out = HERE / "results" / "trainer_methods_toy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    for method in ("draft", "ddpo"):
        r = results[method]
        last = {k: v[-1] for k, v in r["gold_per_epoch"].items()}
        print(
            f"{method}: {args.epochs * r['samples_per_epoch']} samples, {r['seconds']} s, "
            f"final gold per cluster {last}"
        )
    print(f"wrote {out}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    for ax, method in zip(axes, ("draft", "ddpo")):
        r = results[method]
        for name, values in r["gold_per_epoch"].items():
            samples = [r["samples_per_epoch"] * (i + 1) for i in range(len(values))]
            ax.plot(samples, values, marker="o", ms=3, label=name)
        ax.set_title(f"{method} (matched)")
        ax.set_xlabel("images sampled")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gold utility of images made for the cluster")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
