"""Why does `matched` sometimes trail `mean` on the majority? Score both policies' majority
images with the majority's own head, the mean head and the gold utility.

    python benchmarks/majority_gap_toy.py --base-seeds 5 6 7

Per toy base seed S, the demo's `mean` and `matched` policies (configs/toy.yaml, policy seed S,
as `demo_seeds.py` trains them) on 48 held-out images: all of `mean`'s, and the 16 `matched`
made for the majority cluster. If `mean`'s images score higher on the majority's head than
`matched`'s own, the matched policy under-optimises its reward; if not, the head is what
limits it. The toy world's images at high majority gold give the head's scale. Writes
benchmarks/results/majority_gap_toy.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from draft_options_toy import held_out_images

from plural_diffusion.cache import cache_root
from plural_diffusion.configs import CONFIGS
from plural_diffusion.ddpo import Trainer
from plural_diffusion.demo import DemoConfig, gold_in_head_order, stage_rewards
from plural_diffusion.rewards import TasteRewards
from plural_diffusion.toyworld.prepare import prepare_toy
from plural_diffusion.toyworld.ratings import load_world
from plural_diffusion.train_config import TrainConfig
from reward_models.config import load_config

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def scored(rewards: TasteRewards, gold, images: torch.Tensor, k: int) -> dict:
    """Mean score of `images` on cluster k's head, on the mean head, and their gold for k."""
    features = torch.cat([rewards.features(x) for x in images.split(256)])
    return {
        "cluster_head": round(rewards.cluster_scores(features)[:, k].mean().item(), 2),
        "mean_head": round(rewards.mean_head.score(features, None).mean().item(), 2),
        "gold": round(gold(images)[:, k].mean().item(), 3),
    }


def one_base(seed: int) -> dict:
    cfg = load_config(DemoConfig, CONFIGS / "demo.yaml")
    cfg.prepare.base.seed = seed
    assets = prepare_toy(cfg.prepare, progress=False)
    run = stage_rewards(cfg, assets, cache_root())
    world = load_world(assets.world)
    rewards = TasteRewards(str(run))
    gold = gold_in_head_order(world, rewards.cluster_names)
    k = int(rewards.cluster_shares.argmax())
    out = {"majority": rewards.cluster_names[k]}
    for objective in ("mean", "matched"):
        tcfg = load_config(
            TrainConfig,
            CONFIGS / "toy.yaml",
            [
                f"base={assets.base}",
                f"rewards={run}",
                f"objective={objective}",
                f"seed={seed}",
                "tensorboard=false",
                "save_every=1000",
                f"out_dir=runs/bench/majority_gap/{seed}/{objective}",
            ],
        )
        trainer = Trainer(tcfg, gold_fn=gold)
        trainer.fit(progress=False)
        taste, images = held_out_images(trainer)
        if objective == "matched":
            images = images[taste == k]
        out[objective] = scored(rewards, gold, images, k)
    world_gold = gold(world.images.images.float())[:, k]
    for level in (0.9, 0.98):
        at = world.images.images[world_gold >= level].float()
        out[f"world, gold >= {level}"] = {"images": len(at), **scored(rewards, gold, at, k)}
    print(f"base {seed}: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-seeds", type=int, nargs="+", default=[5, 6, 7])
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {str(s): one_base(s) for s in args.base_seeds}
    seeds = " ".join(map(str, args.base_seeds))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "majority_gap_toy.json"
    command = f"python benchmarks/majority_gap_toy.py --base-seeds {seeds}"
    path.write_text(json.dumps({"command": command, "bases": results}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
