"""Can a sharper reading of the majority's head close `matched`'s gap to `mean`? Score both
demo policies' majority images with the majority's head, with bootstrapped copies of it, and
with gold.

    python benchmarks/majority_heads_toy.py --base-seeds 1 3 11 12 14 15 18 [--ensemble 4] [--epochs]

Per toy base seed S, the demo's `mean` and `matched` policies (`plural-diffusion demo
prepare.base.seed=S "train_overrides=[seed=S]"`, as `demo_seeds.py` runs it; cached stages are
reused, missing ones trained) draw the demo's evaluation images (16 per taste). `matched`'s
images for the majority cluster and all of `mean`'s are scored by:

  head       the majority cluster's utility under the reward run's rater head (what trains it)
  bagged     the mean over that head and `--ensemble` rater heads, each fitted on a bootstrap
             of the ratings with its own seed (the reward run with ensemble_size=N)
  pessimist  the least of those heads' utilities, per image, averaged
  gold       the toy world's exact utility for the majority cluster

If bagging or pessimism ranked the two policies as gold does where the head does not, a
sharper head would close the gap; if every head ranks them as the single head does, the bias
is shared by every head the ratings can fit. `--epochs` also scores `matched`'s checkpoint of
every epoch (its majority expert's path). Writes benchmarks/results/majority_heads_toy.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from draft_options_toy import demo_stages

from plural_diffusion.cache import cache_root
from plural_diffusion.configs import CONFIGS
from plural_diffusion.demo import DemoConfig, stage_policy
from plural_diffusion.evaluate import generate_images, policy_tastes
from plural_diffusion.policy import TastePolicy
from plural_diffusion.rewards import TasteRewards
from reward_models.config import load_config

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def majority_scores(policy: TastePolicy, rewards: TasteRewards, cfg: DemoConfig, gold, k: int):
    """{head, bagged, pessimist, gold}: mean scores of the policy's images for cluster k (a
    taste-blind policy's only images)."""
    tastes = policy_tastes(policy, rewards)
    if len(tastes) > 1:
        tastes = [tastes[k]]
    settings = policy.settings(cfg.eval.sampling)
    images = generate_images(
        policy, cfg.eval.prompts, tastes, cfg.eval.seeds, settings, cfg.eval.batch_size, False
    )[0].flatten(0, 1)  # [P * S, 3, H, W]
    features = rewards.features(images)
    index = torch.full((len(images),), k)
    utility = rewards.ensemble_utilities(features, index, "clusters")  # [M, N]
    return {
        "head": round(utility[0].mean().item(), 3),
        "bagged": round(utility.mean().item(), 3),
        "pessimist": round(utility.min(dim=0).values.mean().item(), 3),
        "gold": round(gold(images)[:, k].mean().item(), 3),
    }


def one_base(seed: int, ensemble: int, epochs: bool) -> dict:
    cfg = load_config(
        DemoConfig,
        CONFIGS / "demo.yaml",
        [f"prepare.base.seed={seed}", f"train_overrides=[seed={seed}]"],
    )
    assets, run, _, names, gold = demo_stages(seed)
    # the same rater head plus bootstrapped members; the policies train on `run`'s heads
    _, bagged_run, _, _, _ = demo_stages(seed, reward_overrides=[f"ensemble_size={ensemble}"])
    rewards = TasteRewards(str(bagged_run))
    k = int(rewards.cluster_shares.argmax())
    out = {"majority": names[k]}
    root = cache_root()
    for objective in ("mean", "matched"):
        stage = stage_policy(cfg, objective, assets.base, run, gold, root)
        policy = TastePolicy.from_pretrained(str(assets.base), str(stage / "policy"))
        out[objective] = majority_scores(policy, rewards, cfg, gold, k)
        if objective == "matched" and epochs:
            out["matched_epochs"] = {
                ckpt.name: majority_scores(
                    TastePolicy.from_pretrained(str(assets.base), str(ckpt / "policy")),
                    rewards,
                    cfg,
                    gold,
                    k,
                )
                for ckpt in sorted((stage / "checkpoints").glob("epoch-*"))
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-seeds", type=int, nargs="+", default=[1, 3, 11, 12, 14, 15, 18])
    parser.add_argument("--ensemble", type=int, default=4, help="bootstrapped rater heads")
    parser.add_argument("--epochs", action="store_true", help="score every matched checkpoint")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    for seed in args.base_seeds:
        r = results[seed] = one_base(seed, args.ensemble, args.epochs)
        same = [
            kind
            for kind in ("head", "bagged", "pessimist")
            if (r["matched"][kind] > r["mean"][kind]) == (r["matched"]["gold"] > r["mean"]["gold"])
        ]
        print(
            f"base {seed} {r['majority']}: "
            + " | ".join(
                f"{kind} mean {r['mean'][kind]:.3f} matched {r['matched'][kind]:.3f}"
                for kind in ("gold", "head", "bagged", "pessimist")
            )
            + f" | ranked as gold: {', '.join(same) or 'none'}",
            flush=True,
        )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "majority_heads_toy.json"
    record = {
        "command": "python benchmarks/majority_heads_toy.py "
        + " ".join(
            ["--base-seeds", *map(str, args.base_seeds), "--ensemble", str(args.ensemble)]
            + (["--epochs"] if args.epochs else [])
        ),
        "bases": results,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
