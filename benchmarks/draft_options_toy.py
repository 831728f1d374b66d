"""Trainer options on the demo's matched policy: train with each set of overrides, then score
48 held-out images (16 per taste, fixed prompts and noise) with the gold utilities.

    python benchmarks/draft_options_toy.py "epochs=12 objective=mean" "epochs=12" \
        "epochs=12 draft.normalize=false" "epochs=12 seed=1" "epochs=24 draft.normalize=false"
    python benchmarks/draft_options_toy.py --reward-overrides ensemble_size=4 \
        "epochs=12 ensemble_penalty=1.0" "epochs=12 ensemble_penalty=3.0"
"""

import argparse

import torch

from plural_diffusion.cache import cache_root
from plural_diffusion.configs import CONFIGS
from plural_diffusion.ddpo import Trainer
from plural_diffusion.demo import DemoConfig, gold_in_head_order, stage_rewards
from plural_diffusion.policy import TastePolicy
from plural_diffusion.rewards import TasteRewards
from plural_diffusion.toyworld.prepare import prepare_toy
from plural_diffusion.toyworld.ratings import load_world
from plural_diffusion.train_config import TrainConfig
from reward_models.config import load_config


@torch.no_grad()
def held_out_gold(trainer: Trainer, gold, n: int = 48) -> list[float]:
    """Gold utility per cluster of images made for that cluster (all images if taste-blind)."""
    g = torch.Generator().manual_seed(1234)
    trainer.generator = g
    prompt, taste, z, noise = trainer.draw_batch(n)
    policy = TastePolicy(trainer.pipe, trainer.conditioner, sampling=trainer.cfg.sampling)
    traj = policy.sample(
        prompt_embeds=trainer.prompt_embeds[prompt],
        negative_embeds=trainer.negative_embeds[prompt],
        tastes=z,
        noise=noise,
        generator=g,
    )
    scores = gold(traj.images)  # [n, K]
    if trainer.tastes is None:
        return [round(x, 3) for x in scores.mean(0).tolist()]
    return [round(scores[taste == k, k].mean().item(), 3) for k in range(scores.shape[1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="one quoted set of train overrides per run")
    parser.add_argument("--reward-overrides", nargs="*", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(DemoConfig, CONFIGS / "demo.yaml")
    cfg.reward_overrides = [*cfg.reward_overrides, *args.reward_overrides]
    assets = prepare_toy(cfg.prepare, progress=False)
    run = stage_rewards(cfg, assets, cache_root())
    gold = gold_in_head_order(load_world(assets.world), TasteRewards(str(run)).cluster_names)
    for overrides in args.runs:
        tcfg = load_config(
            TrainConfig,
            CONFIGS / "toy.yaml",
            [
                f"base={assets.base}",
                f"rewards={run}",
                "tensorboard=false",
                "save_every=1000",
                f"out_dir=runs/bench/draft_options/{overrides.replace(' ', '_')}",
                *overrides.split(),
            ],
        )
        trainer = Trainer(tcfg, gold_fn=gold)
        history = trainer.fit(progress=False)
        seconds = round(sum(e["seconds"] for e in history))
        print(f"{overrides}: {seconds} s, held-out gold per cluster {held_out_gold(trainer, gold)}")


if __name__ == "__main__":
    main()
