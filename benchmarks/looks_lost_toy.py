"""Where do a taste's looks go? The default matched policy's images per taste against the base
model's, on the pixel statistics the gold utilities read, per toy base seed.

    python benchmarks/looks_lost_toy.py --base-seeds 0 1 2 3 4

For each base seed: train the demo's matched policy (configs/toy.yaml) and draw 96 held-out
images (32 per taste, fixed prompts and noise); per taste, the spread (std) of luminance,
colourfulness, warmth and contrast over its images against the base model's spread on the same
prompts and noise, split into the statistics the cluster's gold utility weighs and the ones it
ignores (precision 0: any value pleases it equally), and the Vendi score. Before training, how
many of 1,536 base images each cluster gives gold >= 0.5 / >= 0.8 and how varied those are: the
looks a taste has within the base model's reach. Writes
benchmarks/results/looks_lost_toy.json and, per seed, looks_lost_toy-S.png (rows: base, then
each taste).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from draft_options_toy import demo_stages, held_out_images
from looks_in_world_toy import looks_at_gold, median_vendi
from torchvision.utils import save_image

from plural_diffusion.configs import CONFIGS
from plural_diffusion.ddpo import Trainer
from plural_diffusion.evaluate import vendi_score
from plural_diffusion.toyworld.raters import STATS, pixel_stats
from plural_diffusion.train_config import TrainConfig
from reward_models.config import load_config

RESULTS = Path(__file__).resolve().parent / "results"


def base_support(trainer: Trainer, gold, names: list[str], batches: int = 16) -> dict:
    """How many of the base model's images (16 x 96 draws) each cluster gives gold >= 0.5 /
    >= 0.8, and the median Vendi of 16 of them (20 picks): the looks within the base's reach."""
    images = torch.cat(
        [held_out_images(trainer, 96, base=True, seed=99 + b)[1] for b in range(batches)]
    )
    scores = gold(images)
    features = torch.cat([trainer.rewards.features(x) for x in images.split(256)])
    g = torch.Generator().manual_seed(0)
    out = {"images": len(images), "any_16": median_vendi(features, torch.arange(len(images)), g)}
    for k, name in enumerate(names):
        looks = looks_at_gold(scores[:, k], features, g)
        out.update({f"{name} {key}": value for key, value in looks.items()})
    return out


def one_base(seed: int) -> dict:
    assets, run, world, names, gold = demo_stages(seed)
    overrides = [f"base={assets.base}", f"rewards={run}", f"seed={seed}", "tensorboard=false"]
    out = f"out_dir=runs/bench/looks_lost/base-{seed}"
    trainer = Trainer(load_config(TrainConfig, CONFIGS / "toy.yaml", [*overrides, out]))
    _, base_images = held_out_images(trainer, 96, base=True)
    support = base_support(trainer, gold, names)
    trainer.fit(progress=False)
    taste, images = held_out_images(trainer, 96)
    precision = {c.name: c.precision for c in world.raters.cluster_specs}
    base_std = pixel_stats(base_images).std(dim=0)
    result = {"base_vendi": round(vendi_score(trainer.rewards.features(base_images)), 2)}
    result["base_support"] = support
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
    names = [n for n in seeds[args.base_seeds[0]] if n not in ("base_vendi", "base_support")]
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
