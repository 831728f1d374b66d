"""Does the toy world allow several looks at high gold? The Vendi score of 16 of the world's own
images that a cluster gives gold >= 0.5 / >= 0.8, against any 16 of its images. And does the
cluster's learned head care about a look the gold ignores? Those gold >= 0.8 images with their
hue turned (HSV, saturation and value kept): the gold and the head's mean score per turn.

    python benchmarks/looks_in_world_toy.py

The demo's world and reward run (cached), the reward run's CLIP features (the evaluation's),
the median over 20 random draws of 16. Writes benchmarks/results/looks_in_world_toy.json.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
from torchvision.transforms.functional import adjust_hue

from plural_diffusion.cache import cache_root
from plural_diffusion.configs import CONFIGS
from plural_diffusion.demo import DemoConfig, stage_rewards
from plural_diffusion.evaluate import vendi_score
from plural_diffusion.rewards import TasteRewards
from plural_diffusion.toyworld.prepare import prepare_toy
from plural_diffusion.toyworld.raters import gold_cluster_utility
from plural_diffusion.toyworld.ratings import load_world
from reward_models.config import load_config

RESULTS = Path(__file__).resolve().parent / "results"
DRAWS, SIZE = 20, 16


def median_vendi(features: torch.Tensor, rows: torch.Tensor, g: torch.Generator) -> float | None:
    """Median Vendi score of DRAWS random picks of SIZE of `rows`; None when there are fewer."""
    if len(rows) < SIZE:
        return None
    picks = [rows[torch.randperm(len(rows), generator=g)[:SIZE]] for _ in range(DRAWS)]
    return round(statistics.median(vendi_score(features[p]) for p in picks), 2)


def looks_at_gold(gold: torch.Tensor, features: torch.Tensor, g: torch.Generator) -> dict:
    """For one cluster's gold [N] of N images with `features` [N, D]: how many reach gold 0.5
    and 0.8, and the median Vendi of SIZE of them."""
    out = {}
    for threshold in (0.5, 0.8):
        rows = (gold >= threshold).nonzero().flatten()
        out[f"gold>={threshold}"] = {
            "images": len(rows),
            "vendi_of_16": median_vendi(features, rows, g),
        }
    return out


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    cfg = load_config(DemoConfig, CONFIGS / "demo.yaml")
    assets = prepare_toy(cfg.prepare, progress=False)
    rewards = TasteRewards(str(stage_rewards(cfg, assets, cache_root())))
    world = load_world(assets.world)
    images = world.images.images
    gold = gold_cluster_utility(images, world.raters)  # [N, K]
    features = torch.cat(
        [rewards.features(images[i : i + 256]) for i in range(0, len(images), 256)]
    )
    g = torch.Generator().manual_seed(0)
    result = {
        "command": "python benchmarks/looks_in_world_toy.py",
        "images": len(images),
        "any_16": median_vendi(features, torch.arange(len(images)), g),
        "clusters": {},
    }
    for k, name in enumerate(world.raters.cluster_names):
        entry = looks_at_gold(gold[:, k], features, g)
        rows = (gold[:, k] >= 0.8).nonzero().flatten()
        head = rewards.cluster_names.index(name)
        entry["hue_turned"] = {}
        for turn in (-0.4, -0.2, 0.0, 0.2, 0.4):
            turned = adjust_hue(images[rows].float(), turn)
            scores = rewards.cluster_scores(rewards.features(turned))[:, head]
            entry["hue_turned"][f"{turn:+.1f}"] = {
                "gold": round(gold_cluster_utility(turned, world.raters)[:, k].mean().item(), 3),
                "head": round(scores.mean().item(), 2),
            }
        result["clusters"][name] = entry
        print(name, json.dumps(entry), flush=True)
    print(f"any {SIZE} of the world's images: Vendi {result['any_16']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "looks_in_world_toy.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
