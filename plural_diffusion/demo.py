"""`plural-diffusion demo`: the main job on the built-in toy world, end to end.

Stages (each cached by config hash, so a rerun reuses what is finished and an interrupted
policy run resumes from its last checkpoint):
  1. prepare the toy world and its tiny models (`toy prepare`);
  2. train the reward heads (mean and rater-aware) and taste clusters, and evaluate them;
  3. train the policies: `mean` (the baseline) and `matched` (taste-conditioned, rewarded by the
     head of the taste it was asked for); `maxmin`, the taste-blind policy for the worst-off
     cluster, is by default the egalitarian lottery over matched's clusters
     (`plural_diffusion.lottery`: shares fitted on the learned heads, no training), or with
     maxmin=trained a LoRA trained on objective=maxmin;
  4. generate for every policy on the same prompts and seeds, score with learned heads and gold
     utilities (`plural_diffusion.evaluate`), write metrics.json, image grids, a summary table and
     report.html (`plural_diffusion.report`), with the matched policy's over-optimisation curve
     over its training checkpoints.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plural_diffusion.cache import cache_root, cached_stage, code_fingerprint
from plural_diffusion.configs import config_path
from plural_diffusion.ddpo import final_checkpoint
from plural_diffusion.ddpo import train as train_policy
from plural_diffusion.evaluate import EvalConfig, evaluate_policies, gold_in_head_order
from plural_diffusion.lottery import fit_lottery
from plural_diffusion.report import summary_table, write_report
from plural_diffusion.rewards import TasteRewards
from plural_diffusion.toyworld.prepare import ToyPrepareConfig, prepare_toy
from plural_diffusion.toyworld.ratings import load_world
from plural_diffusion.train_config import TrainConfig
from plural_diffusion.visualize import save_grid
from reward_models.config import load_config, to_dict
from reward_models.errors import UserError
from reward_models.io import write_json
from reward_models.workflow import RewardTrainConfig, evaluate
from reward_models.workflow import train as train_rewards


@dataclass
class DemoConfig:
    prepare: ToyPrepareConfig = field(default_factory=ToyPrepareConfig)
    reward_config: str = "reward-toy.yaml"  # a shipped config (plural_diffusion/configs/) or a path
    reward_overrides: list[str] = field(default_factory=list)
    train_config: str = "toy.yaml"  # a shipped config or a path
    train_overrides: list[str] = field(default_factory=list)
    policies: list[str] = field(default_factory=lambda: ["mean", "matched", "maxmin"])
    # maxmin: "lottery" draws each image's cluster from matched's by egalitarian shares
    # (plural_diffusion.lottery); "trained" trains a taste-blind LoRA on objective=maxmin
    maxmin: str = "lottery"
    # the lottery's shares are fitted on this many images per prompt and cluster, on seeds the
    # evaluation does not use (eval.seed + 100000, ...)
    lottery_images_per_prompt: int = 16
    eval: EvalConfig = field(default_factory=EvalConfig)
    # The toy models are tiny: per-op overhead dominates and a second intra-op thread mostly adds
    # OpenMP barrier waits (README, "Timing").
    num_threads: int = 1


def stage_rewards(cfg: DemoConfig, assets, root: Path) -> Path:
    rcfg = load_config(
        RewardTrainConfig,
        config_path(cfg.reward_config),
        [
            f"data.path={assets.world}",
            f"data.rater_info={assets.world / 'raters.csv'}",
            f"clip.model=local-dir:{assets.clip}",
            f"clip.cache_dir={root / 'features'}",
            *cfg.reward_overrides,
        ],
    )

    def build(tmp: Path) -> None:
        train_rewards(dataclasses.replace(rcfg, out_dir=str(tmp / "run")))
        write_json(tmp / "run" / "metrics.json", evaluate(tmp / "run"))

    key = {**to_dict(rcfg), "out_dir": None, "code": code_fingerprint("reward_models")}
    return cached_stage("toy-rewards", key, build, root=root) / "run"


# Bump when the layout of a cached policy stage changes (2: every checkpoint, not only the last).
POLICY_STAGE_LAYOUT = 2


# the modules a policy stage runs (with the reward heads it scores with)
POLICY_CODE = (
    "plural_diffusion.advantages",
    "plural_diffusion.backbone",
    "plural_diffusion.conditioning",
    "plural_diffusion.ddim",
    "plural_diffusion.diversity",
    "plural_diffusion.ddpo",
    "plural_diffusion.expert_selection",
    "plural_diffusion.rewards",
    "plural_diffusion.sampling",
    "plural_diffusion.train_config",
    "reward_models",
)


def stage_policy(cfg: DemoConfig, objective: str, base: Path, rewards: Path, gold_fn, root: Path):
    """A trained policy: `policy/` (the last checkpoint), `checkpoints/epoch-NNNN/policy` (every
    saved one, for the over-optimisation curve), and the training logs."""
    tcfg = load_config(
        TrainConfig,
        config_path(cfg.train_config),
        [f"base={base}", f"rewards={rewards}", f"objective={objective}", *cfg.train_overrides],
    )
    key = {
        **to_dict(tcfg),
        "out_dir": None,
        "stage_layout": POLICY_STAGE_LAYOUT,
        "code": code_fingerprint(*POLICY_CODE),
    }

    def build(tmp: Path) -> None:
        # Train in a stable work directory, so a killed run resumes from its last checkpoint.
        from plural_diffusion.cache import config_hash

        work = root / "work" / f"toy-policy-{objective}-{config_hash(key)}"
        train_policy(dataclasses.replace(tcfg, out_dir=str(work)), resume=True, gold_fn=gold_fn)
        last = final_checkpoint(work / "checkpoints")  # per-taste selection, if any
        assert last is not None, work
        shutil.copytree(last / "policy", tmp / "policy")
        for ckpt in sorted((work / "checkpoints").glob("epoch-*")):
            if (ckpt / "policy").is_dir():  # the LoRA and taste module; not the optimizer state
                shutil.copytree(ckpt / "policy", tmp / "checkpoints" / ckpt.name / "policy")
        for name in ("history.json", "log.jsonl", "config.json"):
            shutil.copy2(work / name, tmp / name)
        if (work / "selection.json").is_file():
            shutil.copy2(work / "selection.json", tmp / "selection.json")
        shutil.rmtree(work, ignore_errors=True)

    return cached_stage(f"toy-policy-{objective}", key, build, root=root)


def run_demo(cfg: DemoConfig, out_dir: Path, cache_dir: Path | None = None) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.num_threads)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(cfg.policies) - {"mean", "matched", "maxmin"})
    if unknown:
        raise UserError(f"unknown policies {unknown}; choose from mean, matched, maxmin")
    if cfg.maxmin not in ("lottery", "trained"):
        raise UserError(f"maxmin={cfg.maxmin!r}: use lottery or trained")
    lottery = "maxmin" in cfg.policies and cfg.maxmin == "lottery"
    if lottery and "matched" not in cfg.policies:
        raise UserError(
            "maxmin=lottery draws from the matched policy's clusters; add matched to policies "
            "or use maxmin=trained"
        )
    if lottery and cfg.lottery_images_per_prompt < 1:
        raise UserError(f"lottery_images_per_prompt={cfg.lottery_images_per_prompt}: must be >= 1")

    print("[1/4] preparing the toy world and its tiny models (cached)")
    assets = prepare_toy(cfg.prepare, root=root)
    world = load_world(assets.world)

    print("[2/4] training reward heads: mean and rater-aware, and taste clusters (cached)")
    reward_run = stage_rewards(cfg, assets, root)
    rewards = TasteRewards(str(reward_run))
    gold_fn = gold_in_head_order(world, rewards.cluster_names)

    trained = [p for p in cfg.policies if not (lottery and p == "maxmin")]
    print("[3/4] training policies: " + ", ".join(trained) + " (cached)")
    stages = {p: stage_policy(cfg, p, assets.base, reward_run, gold_fn, root) for p in trained}
    lotteries = None
    if lottery:
        start = cfg.eval.seed + 100_000
        fitted = fit_lottery(
            assets.base,
            stages["matched"] / "policy",
            rewards,
            cfg.eval.prompts,
            [start + i for i in range(cfg.lottery_images_per_prompt)],
            cfg.eval.sampling,
            cfg.eval.batch_size,
        )
        write_json(out_dir / "lottery.json", fitted)
        lotteries = {"maxmin": ("matched", torch.tensor(fitted["shares"]))}
        shares = ", ".join(f"{n} {s:.2f}" for n, s in zip(fitted["clusters"], fitted["shares"]))
        print(f"      maxmin: the egalitarian lottery over matched's clusters ({shares})")

    print("[4/4] generating per taste and measuring against the mean baseline")
    metrics, images = evaluate_policies(
        str(assets.base),
        {name: stage / "policy" for name, stage in stages.items()},
        rewards,
        cfg.eval,
        gold_fn=gold_fn,
        baseline="mean" if "mean" in stages else "base",
        curves={"matched": stages["matched"] / "checkpoints"} if "matched" in stages else None,
        lotteries=lotteries,
    )
    if lottery:
        metrics["policies"]["maxmin"]["lottery"]["fit"] = {
            k: fitted[k] for k in ("cross_reward", "base_reward", "gain", "min_gain", "seeds")
        }
    metrics["reward_heads"] = _head_summary(reward_run)
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out_dir / "metrics.json", metrics)
    _write_grids(images, cfg.eval, out_dir)
    report = write_report(out_dir / "report.html", metrics, images)
    print()
    print(summary_table(metrics))
    print(
        f"\nwrote {out_dir / 'metrics.json'} and image grids in {out_dir} ({metrics['seconds']} s)"
    )
    print(f"report: {report.resolve()}")
    return metrics


def _head_summary(reward_run: Path) -> dict:
    from reward_models.io import read_json

    m = read_json(reward_run / "metrics.json")
    group = "known_group" if "known_group" in m["heads"]["mean"] else "discovered_cluster"
    return {
        head: {
            g: round(v["pairwise_accuracy"], 3)
            for g, v in m["heads"][head][group]["per_group"].items()
        }
        for head in m["heads"]
    }


def _write_grids(images: dict, cfg: EvalConfig, out_dir: Path) -> None:
    n = min(len(cfg.seeds), 8)
    rows, labels = [], []
    for policy, per_taste in images.items():
        for taste, x in per_taste.items():
            rows.append(x[:n])  # the first prompt's images (prompt-major)
            labels.append(policy if taste == "none" else f"{policy} → {taste}")
    save_grid(
        torch.stack(rows),
        out_dir / "policies_grid.png",
        row_labels=labels,
        title=f"'{cfg.prompts[0]}': same seeds in every column",
    )
