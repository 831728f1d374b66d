"""Trainer options on the demo's matched policy: train with each set of overrides, then score
48 held-out images (16 per taste, fixed prompts and noise) with the gold utilities.

    python benchmarks/draft_options_toy.py "epochs=12 objective=mean" "epochs=12" \
        "epochs=12 draft.normalize=false" "epochs=12 seed=1" "epochs=24 draft.normalize=false"
    python benchmarks/draft_options_toy.py --reward-overrides ensemble_size=4 \
        "epochs=12 ensemble_penalty=1.0" "epochs=12 ensemble_penalty=3.0"
    python benchmarks/draft_options_toy.py --base-seed 1 "lora.experts=true" \
        "lora.experts=false select_experts=false restart_experts=false"

--base-seed trains (and caches) the toy base from another seed, as the demo's
prepare.base.seed does. Each line also gives the within-taste Vendi score of the held-out
images (CLIP features, 16 per taste) and the base model's Vendi on the same prompts and noise.
"""

import argparse
from contextlib import nullcontext

import torch

from plural_diffusion.backbone import disable_adapters
from plural_diffusion.cache import cache_root
from plural_diffusion.configs import CONFIGS
from plural_diffusion.ddpo import Trainer
from plural_diffusion.demo import DemoConfig, gold_in_head_order, stage_rewards
from plural_diffusion.evaluate import vendi_score
from plural_diffusion.policy import TastePolicy
from plural_diffusion.rewards import TasteRewards
from plural_diffusion.toyworld.prepare import prepare_toy
from plural_diffusion.toyworld.ratings import load_world
from plural_diffusion.train_config import TrainConfig
from reward_models.config import load_config


def demo_stages(base_seed: int | None = None, reward_overrides=()):
    """The demo's stages (`plural-diffusion demo`, cached): toy world, base (trained from
    `base_seed` if given), reward run; with the world, the cluster names and their gold."""
    cfg = load_config(DemoConfig, CONFIGS / "demo.yaml")
    if base_seed is not None:
        cfg.prepare.base.seed = base_seed
    cfg.reward_overrides = [*cfg.reward_overrides, *reward_overrides]
    assets = prepare_toy(cfg.prepare, progress=False)
    run = stage_rewards(cfg, assets, cache_root())
    world = load_world(assets.world)
    names = TasteRewards(str(run)).cluster_names
    return assets, run, world, names, gold_in_head_order(world, names)


def toy_train_config(assets, run, out_dir: str, *overrides: str) -> TrainConfig:
    """configs/toy.yaml on the demo's base and reward run, no tracker, no checkpoints."""
    return load_config(
        TrainConfig,
        CONFIGS / "toy.yaml",
        [
            f"base={assets.base}",
            f"rewards={run}",
            "tensorboard=false",
            "save_every=1000",
            f"out_dir={out_dir}",
            *overrides,
        ],
    )


def cross_taste_gold(scores: torch.Tensor, taste: torch.Tensor) -> list[list[float]]:
    """Gold [n, K] of images made for tastes [n] -> [K, K] means (rows: made for; columns:
    scored by); its diagonal is each cluster's gold on its own images."""
    ks = range(scores.shape[1])
    return [[round(scores[taste == k, j].mean().item(), 3) for j in ks] for k in ks]


@torch.no_grad()
def held_out_images(trainer: Trainer, n: int = 48, base: bool = False, seed: int = 1234):
    """Taste indices [n] and images [n, 3, H, W] on fixed prompts and noise (base=True: the
    LoRA off, no taste), drawn aside (`Trainer._draws_aside`): training afterwards draws what
    it would have drawn."""
    conditioner = None if base else trainer.conditioner
    policy = TastePolicy(trainer.pipe, conditioner, sampling=trainer.cfg.sampling)
    with trainer._draws_aside(seed), disable_adapters(trainer.unet) if base else nullcontext():
        _, taste, _, traj = trainer._sample_batch(n, policy=policy)
    return taste, traj.images.float()


def held_out(trainer: Trainer, gold, n: int = 48, base: bool = False):
    """Gold utility per cluster of images made for that cluster (all images if taste-blind),
    the Vendi score of each taste's images (`held_out_images`), and the cross-taste gold
    matrix (`cross_taste_gold`; None if taste-blind)."""
    taste, images = held_out_images(trainer, n, base)
    scores = gold(images.cpu())  # [n, K]; the gold utilities are computed on the CPU
    features = trainer.rewards.features(images)
    if trainer.tastes is None or base:
        gold_all = [round(x, 3) for x in scores.mean(0).tolist()]
        return gold_all, [round(vendi_score(features), 2)], None
    cross = cross_taste_gold(scores, taste)
    ks = range(scores.shape[1])
    vendi = [round(vendi_score(features[taste == k]), 2) for k in ks]
    return [cross[k][k] for k in ks], vendi, cross


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="one quoted set of train overrides per run")
    parser.add_argument("--reward-overrides", nargs="*", default=[])
    parser.add_argument("--base-seed", type=int, default=None, help="toy base seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    assets, run, _, _, gold = demo_stages(args.base_seed, args.reward_overrides)
    for overrides in args.runs:
        out = f"runs/bench/draft_options/{overrides.replace(' ', '_')}"
        tcfg = toy_train_config(assets, run, out, *overrides.split())
        trainer = Trainer(tcfg, gold_fn=gold)
        if overrides == args.runs[0]:
            gold_base, vendi_base, _ = held_out(trainer, gold, base=True)
            print(f"base model: held-out gold {gold_base}, Vendi {vendi_base}", flush=True)
        history = trainer.fit(progress=False)
        seconds = round(sum(e["seconds"] for e in history))
        g, v, cross = held_out(trainer, gold)
        line = f"{overrides}: {seconds} s, held-out gold per cluster {g}, Vendi {v}"
        if cross is not None:
            line += f", cross-taste gold (rows made for, columns scored by) {cross}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
