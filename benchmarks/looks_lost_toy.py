"""Where do a taste's looks go? The default matched policy's images per taste against the base
model's, on the pixel statistics the gold utilities read, per toy base seed.

    python benchmarks/looks_lost_toy.py --base-seeds 0 1 2 3 4

For each base seed: train the demo's matched policy (configs/toy.yaml) and draw 96 held-out
images (32 per taste, fixed prompts and noise); per taste, the spread (std) of luminance,
colourfulness, warmth and contrast over its images against the base model's spread on the same
prompts and noise, split into the statistics the cluster's gold utility weighs and the ones it
ignores (precision 0: any value pleases it equally), and the Vendi score. Writes
benchmarks/results/looks_lost_toy.json and, per seed, looks_lost_toy-S.png (rows: base, then
each taste).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

import torch
from torchvision.utils import save_image

from plural_diffusion.backbone import disable_adapters
from plural_diffusion.cache import cache_root
from plural_diffusion.configs import CONFIGS
from plural_diffusion.ddpo import Trainer
from plural_diffusion.demo import DemoConfig, gold_in_head_order, stage_rewards
from plural_diffusion.evaluate import vendi_score
from plural_diffusion.policy import TastePolicy
from plural_diffusion.rewards import TasteRewards
from plural_diffusion.toyworld.prepare import prepare_toy
from plural_diffusion.toyworld.raters import STATS, pixel_stats
from plural_diffusion.toyworld.ratings import load_world
from plural_diffusion.train_config import TrainConfig
from reward_models.config import load_config

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def draw(trainer: Trainer, base: bool, n: int = 96):
    """Taste indices [n] and images [n, 3, H, W] on fixed prompts and noise (LoRA off: base)."""
    g = torch.Generator().manual_seed(1234)
    trainer.generator = g
    prompt, taste, z, noise = trainer.draw_batch(n)
    embeds, negative = trainer._embeds(prompt)
    conditioner = None if base else trainer.conditioner
    policy = TastePolicy(trainer.pipe, conditioner, sampling=trainer.cfg.sampling)
    with disable_adapters(trainer.unet) if base else contextlib.nullcontext():
        traj = policy.sample(
            prompt_embeds=embeds,
            negative_embeds=negative,
            tastes=None if base else z,
            noise=noise,
            generator=g,
        )
    return taste, traj.images.float()


def one_base(seed: int) -> dict:
    cfg = load_config(DemoConfig, CONFIGS / "demo.yaml")
    cfg.prepare.base.seed = seed
    assets = prepare_toy(cfg.prepare, progress=False)
    run = stage_rewards(cfg, assets, cache_root())
    names = TasteRewards(str(run)).cluster_names
    world = load_world(assets.world)
    gold = gold_in_head_order(world, names)
    overrides = [f"base={assets.base}", f"rewards={run}", f"seed={seed}", "tensorboard=false"]
    out = f"out_dir=runs/bench/looks_lost/base-{seed}"
    trainer = Trainer(load_config(TrainConfig, CONFIGS / "toy.yaml", [*overrides, out]))
    _, base_images = draw(trainer, base=True)
    trainer.fit(progress=False)
    taste, images = draw(trainer, base=False)
    precision = {c.name: c.precision for c in world.raters.cluster_specs}
    base_std = pixel_stats(base_images).std(dim=0)
    result = {"base_vendi": round(vendi_score(trainer.rewards.features(base_images)), 2)}
    for k, name in enumerate(names):
        mine = images[taste == k]
        ratio = (pixel_stats(mine).std(dim=0) / base_std).tolist()
        weighed = [r for r, p in zip(ratio, precision[name]) if p > 0]
        ignored = [r for r, p in zip(ratio, precision[name]) if p == 0]
        result[name] = {
            "gold": round(gold(mine)[:, k].mean().item(), 3),
            "vendi": round(vendi_score(trainer.rewards.features(mine)), 2),
            "spread_vs_base": {s: round(r, 2) for s, r in zip(STATS, ratio)},
            "spread_vs_base_weighed": round(statistics.fmean(weighed), 2),
            "spread_vs_base_ignored": round(statistics.fmean(ignored), 2),
        }
    grid = [base_images[:32]] + [images[taste == k][:32] for k in range(len(names))]
    save_image(torch.cat(grid), RESULTS / f"looks_lost_toy-{seed}.png", nrow=16, padding=1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    torch.set_num_threads(2)
    seeds = {}
    for seed in args.base_seeds:
        seeds[seed] = one_base(seed)
        print(seed, json.dumps(seeds[seed]), flush=True)
    names = [n for n in seeds[args.base_seeds[0]] if n != "base_vendi"]
    summary = {}
    for name in names:
        for key in ("spread_vs_base_weighed", "spread_vs_base_ignored", "vendi"):
            values = [seeds[s][name][key] for s in seeds]
            summary[f"{name} {key}"] = {
                "median": statistics.median(values),
                "range": [min(values), max(values)],
            }
    command = "python benchmarks/looks_lost_toy.py --base-seeds " + " ".join(
        map(str, args.base_seeds)
    )
    out = {"command": command, "seeds": seeds, "summary": summary}
    (RESULTS / "looks_lost_toy.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
