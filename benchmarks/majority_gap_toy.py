"""Why does `matched` sometimes trail `mean` on the majority? Score both policies' majority
images with the majority's own head, the mean head and the gold utility.

    python benchmarks/majority_gap_toy.py --base-seeds 5 6 7

Per toy base seed S, the demo's `mean` and `matched` policies (configs/toy.yaml, policy seed S,
as `demo_seeds.py` trains them) on 48 held-out images: all of `mean`'s, and the 16 `matched`
made for the majority cluster. If `mean`'s images score higher on the majority's head than
`matched`'s own, the matched policy under-optimises its reward; if not, the head is what
limits it. The toy world's images at high majority gold give the head's scale. Writes
benchmarks/results/majority_gap_toy.json.

    python benchmarks/majority_gap_toy.py --base-seeds 5 6 7 --blend

also trains `matched` with each taste's reward shrunk toward the mean head by its cluster's
share, r_k = (1 - s_k) head(x, z_k) + s_k mean_head(x) (the majority leans most on the head
fit to every rating, the smallest least), and gives every cluster's held-out gold for both
policies (results/majority_gap_toy-blend.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from draft_options_toy import cross_taste_gold, demo_stages, held_out_images, toy_train_config

from plural_diffusion.ddpo import Trainer
from plural_diffusion.rewards import TasteRewards

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


def one_base(seed: int, blend: bool = False) -> dict:
    assets, run, world, _, gold = demo_stages(seed)
    rewards = TasteRewards(str(run))
    k = int(rewards.cluster_shares.argmax())
    out = {"majority": rewards.cluster_names[k]}
    for objective in ("mean", "matched", "matched, blended") if blend else ("mean", "matched"):
        out_dir = f"runs/bench/majority_gap/{seed}/{objective.replace(', ', '-')}"
        extra = ["mean_blend=1"] if objective == "matched, blended" else []
        tcfg = toy_train_config(
            assets, run, out_dir, f"objective={objective.split(',')[0]}", f"seed={seed}", *extra
        )
        trainer = Trainer(tcfg, gold_fn=gold)
        trainer.fit(progress=False)
        taste, images = held_out_images(trainer)
        if objective == "mean":
            out[objective] = scored(rewards, gold, images, k)
            continue
        out[objective] = scored(rewards, gold, images[taste == k], k)
        cross = cross_taste_gold(gold(images), taste)
        out[objective]["gold_per_cluster"] = [cross[j][j] for j in range(len(cross))]
    world_gold = gold(world.images.images.float())[:, k]
    for level in (0.9, 0.98):
        at = world.images.images[world_gold >= level].float()
        out[f"world, gold >= {level}"] = {"images": len(at), **scored(rewards, gold, at, k)}
    print(f"base {seed}: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-seeds", type=int, nargs="+", default=[5, 6, 7])
    parser.add_argument("--blend", action="store_true", help="also matched with blended rewards")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {str(s): one_base(s, args.blend) for s in args.base_seeds}
    seeds = " ".join(map(str, args.base_seeds))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("majority_gap_toy-blend.json" if args.blend else "majority_gap_toy.json")
    command = f"python benchmarks/majority_gap_toy.py --base-seeds {seeds}"
    command += " --blend" if args.blend else ""
    path.write_text(json.dumps({"command": command, "bases": results}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
