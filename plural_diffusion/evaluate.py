"""Evaluate policies side by side against the mean baseline: per-cluster reward and gold utility,
worst cluster, win rates, cross-taste matrix, diversity, and over-optimisation across checkpoints.

Every policy generates from the same prompts and the same seeds (see `plural_diffusion.generate`:
an image is fixed by its taste, prompt and seed), with the sampler it was trained with (DDIM
steps, guidance, eta, negative prompt; `EvalConfig.sampling` overrides values for all); the base
model, which was not trained, samples as the first trained policy does, so the two are compared
on the same sampler. A taste-conditioned policy generates one set per
taste cluster, asked for that cluster's centroid taste; a taste-blind one (base, mean, maxmin)
generates one set, keyed "none", that every cluster judges. Scores come from the learned heads
(the proxy the policies were trained on) and, where the world knows them (the toy world), from
the gold utilities the policies never saw.

    metrics, images = evaluate_policies(base, {"mean": DIR, "matched": DIR}, rewards, EvalConfig(),
                                        gold_fn=toy_gold(world_dir, rewards.cluster_names))
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from plural_diffusion.diversity import mean_pairwise_distance, vendi_score
from plural_diffusion.generate import Taste, generate_images
from plural_diffusion.policy import (
    CheckpointInfo,
    SamplerSettings,
    SamplingOverrides,
    TastePolicy,
    policy_dir,
    resolve_settings,
)
from plural_diffusion.rewards import TasteRewards
from plural_diffusion.visualize import NO_TASTE
from reward_models.errors import UserError


@dataclass
class EvalConfig:
    prompts: list[str] = field(default_factory=lambda: ["an image of one circle"])
    images_per_prompt: int = 8  # per prompt and taste; the same seeds for every policy
    seed: int = 1234  # images use seeds seed, seed + 1, ... (unless seed_list is given)
    seed_list: list[int] | None = None
    # sampler values that replace every policy's trained ones (unset: each samples as trained)
    sampling: SamplingOverrides = field(default_factory=SamplingOverrides)
    batch_size: int = 24  # images per sampling call
    # per prompt and taste at each training checkpoint, for the over-optimisation curve
    curve_images_per_prompt: int = 4
    # the UNet's, VAE's and text encoder's dtype: fp32, bf16 or fp16 (a GPU's; the LoRA and the
    # taste module stay float32)
    dtype: str = "fp32"
    compile_unet: bool = False  # torch.compile each policy's UNet (pays off on a GPU)

    @property
    def seeds(self) -> list[int]:
        if self.seed_list:
            return list(self.seed_list)
        return [self.seed + i for i in range(self.images_per_prompt)]


# --------------------------------------------------------------------------------- gold
def gold_in_head_order(world, cluster_names: list[str]):
    """images -> gold utility [B, K] with columns in the order of the discovered clusters."""
    from plural_diffusion.toyworld.raters import gold_cluster_utility

    gold_names = world.raters.cluster_names
    missing = [n for n in cluster_names if n not in gold_names]
    if missing:
        raise UserError(
            f"discovered clusters {cluster_names} do not match the gold clusters {gold_names} "
            "one to one; set clusters.n_clusters to the number of gold clusters"
        )
    order = [gold_names.index(n) for n in cluster_names]
    return lambda images: gold_cluster_utility(images, world.raters)[:, order]


def toy_gold(world_dir: str | Path, cluster_names: list[str]):
    """The gold-utility function of a toy world written by `toy world` / `toy prepare`."""
    from plural_diffusion.toyworld.ratings import load_world

    if not (Path(world_dir) / "world.json").is_file():
        raise UserError(f"{world_dir}: not a toy world (no world.json); pass the toy world folder")
    return gold_in_head_order(load_world(world_dir), cluster_names)


# --------------------------------------------------------------------------------- generation
def policy_tastes(policy: TastePolicy, rewards: TasteRewards) -> list[Taste]:
    """One taste per cluster for a taste-conditioned policy; the null taste for a blind one."""
    if policy.conditioner is None:
        return [Taste(NO_TASTE, "mean", None)]
    tastes = rewards.cluster_tastes_in(policy.taste_space)
    return [
        Taste(name, f"cluster:{name}", tastes[k].detach().cpu())
        for k, name in enumerate(rewards.cluster_names)
    ]


@torch.no_grad()
def generate_per_taste(
    policy: TastePolicy,
    rewards: TasteRewards,
    cfg: EvalConfig,
    settings: SamplerSettings,
    seeds: list[int] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Images per taste: {cluster name: [P * S, 3, H, W]} (prompt-major) for a
    taste-conditioned policy, {"none": ...} for a taste-blind one or the base model."""
    tastes = policy_tastes(policy, rewards)
    seeds = cfg.seeds if seeds is None else seeds
    images = generate_images(policy, cfg.prompts, tastes, seeds, settings, cfg.batch_size, progress)
    return {t.label: images[i].flatten(0, 1) for i, t in enumerate(tastes)}


# --------------------------------------------------------------------------------- scoring
@dataclass
class Scored:
    """A policy's images per taste and their scores for every cluster."""

    images: dict[str, torch.Tensor]  # taste -> [N, 3, H, W]
    features: dict[str, torch.Tensor]  # taste -> [N, D] CLIP features
    learned: dict[str, torch.Tensor]  # taste -> [N, K] rater-head utility for each cluster
    gold: dict[str, torch.Tensor] | None  # taste -> [N, K] gold utility, where known

    @property
    def matched(self) -> bool:
        return list(self.images) != [NO_TASTE]

    def for_cluster(self, table: dict[str, torch.Tensor], k: int, names: list[str]) -> torch.Tensor:
        """[N] utility for cluster k of the images made for k (all images, if taste-blind)."""
        return table[names[k] if self.matched else NO_TASTE][:, k]

    def subset(self, rows: list[int]) -> Scored:
        def pick(table):
            return None if table is None else {t: x[rows] for t, x in table.items()}

        return Scored(pick(self.images), pick(self.features), pick(self.learned), pick(self.gold))


@torch.no_grad()
def score_images(
    images: dict[str, torch.Tensor], rewards: TasteRewards, gold_fn=None, batch_size: int = 64
) -> Scored:
    device = rewards.cluster_tastes.device

    def features(x):  # [N, 3, H, W] -> [N, D], in batches
        return torch.cat([rewards.features(b.to(device)).cpu() for b in x.split(batch_size)])

    feats = {t: features(x) for t, x in images.items()}
    learned = {t: rewards.cluster_scores(f.to(device)).cpu() for t, f in feats.items()}
    gold = {t: gold_fn(x) for t, x in images.items()} if gold_fn is not None else None
    return Scored(images, feats, learned, gold)


def _metrics_of(s: Scored, names: list[str]) -> dict:
    every = torch.cat(list(s.features.values()))
    m = {
        "tastes": list(s.images),
        "reward_per_cluster": {
            n: s.for_cluster(s.learned, k, names).mean().item() for k, n in enumerate(names)
        },
        "vendi": vendi_score(every),
        "mean_pairwise_distance": mean_pairwise_distance(every),
        "vendi_within_taste": {t: vendi_score(f) for t, f in s.features.items()},
        "mean_pairwise_distance_within_taste": {
            t: mean_pairwise_distance(f) for t, f in s.features.items()
        },
    }
    m["worst_cluster_reward"] = min(m["reward_per_cluster"].values())
    if s.matched:
        m["cross_taste_reward"] = [s.learned[t].mean(dim=0).tolist() for t in names]
    if s.gold is not None:
        m["gold_per_cluster"] = {
            n: s.for_cluster(s.gold, k, names).mean().item() for k, n in enumerate(names)
        }
        m["worst_cluster_gold"] = min(m["gold_per_cluster"].values())
        if s.matched:
            m["cross_taste_gold"] = [s.gold[t].mean(dim=0).tolist() for t in names]
    return m


@torch.no_grad()
def policy_metrics(images: dict[str, torch.Tensor], rewards: TasteRewards, gold_fn=None) -> dict:
    """Figures of one policy from its images per taste (see `generate_per_taste`)."""
    return _metrics_of(score_images(images, rewards, gold_fn), rewards.cluster_names)


def win_rates(policy: Scored, baseline: Scored, names: list[str], margin: float = 0.005) -> dict:
    """Per cluster k: the fraction of (prompt, seed) where the policy's image for k has a higher
    utility for k than the baseline's image on the same prompt and seed, under the learned head
    and, where known, the gold utility. Differences within `margin` are ties and count one half,
    so two near-identical policies score 0.5, not a coin flip per image."""

    def rates(policy_table, baseline_table):
        out = {}
        for k, name in enumerate(names):
            a = policy.for_cluster(policy_table, k, names)
            b = baseline.for_cluster(baseline_table, k, names)
            assert a.shape == b.shape, (a.shape, b.shape)
            wins, ties = (a > b + margin).float(), ((a - b).abs() <= margin).float()
            out[name] = float((wins + 0.5 * ties).mean())
        return out

    result = {"learned": rates(policy.learned, baseline.learned)}
    if policy.gold is not None and baseline.gold is not None:
        result["gold"] = rates(policy.gold, baseline.gold)
    return result


def diagonal_dominance(matrix: list[list[float]]) -> dict:
    """Whether each row's (generated-for) diagonal beats its off-diagonals, and per column
    (scored-by) whether the images made for that cluster score highest with it."""
    m = torch.tensor(matrix)
    k = m.shape[0]
    if k < 2:
        return {"by_column": [True] * k, "all_columns": True, "by_row": [True] * k}
    rows = [bool(m[i, i] > torch.cat([m[i, :i], m[i, i + 1 :]]).max()) for i in range(k)]
    cols = [bool(m[i, i] > torch.cat([m[:i, i], m[i + 1 :, i]]).max()) for i in range(k)]
    return {"by_column": cols, "all_columns": all(cols), "by_row": rows}


# --------------------------------------------------------------------------------- over-optimisation
def checkpoint_series(directory: str | Path) -> list[tuple[int, Path]]:
    """(epoch, policy dir) of every `epoch-NNNN` checkpoint under a training run's
    `checkpoints/` folder (or the run folder holding it), oldest first."""
    directory = Path(directory)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise UserError(f"{directory}: checkpoints folder not found")
    series = []
    for path in sorted(directory.glob("epoch-*")):
        match = re.fullmatch(r"epoch-(\d+)", path.name)
        if match and path.is_dir():
            series.append((int(match.group(1)), policy_dir(path)))
    if not series:
        raise UserError(
            f"{directory}: no epoch-NNNN checkpoints; point at a training run's checkpoints/ folder"
        )
    return series


def _first_seeds(n_prompts: int, n_seeds: int, n: int) -> list[int]:
    """Rows of prompt-major [P * S] images that hold the first n seeds of every prompt."""
    return [p * n_seeds + s for p in range(n_prompts) for s in range(min(n, n_seeds))]


def _same_sampler(a: SamplerSettings, b: SamplerSettings) -> bool:
    return a.sampling == b.sampling and a.negative_prompt == b.negative_prompt


def overoptimisation_curve(
    base: str,
    series: list[tuple[int, Path]],
    rewards: TasteRewards,
    cfg: EvalConfig,
    gold_fn=None,
    base_scored: tuple[Scored, SamplerSettings] | None = None,
    device="cpu",
    progress: bool = False,
) -> dict:
    """Proxy (learned-head) reward and gold utility per cluster at each checkpoint of one run.

    Epoch 0 is the base model (a fresh LoRA and taste module leave it unchanged), sampled as the
    run was trained. Each checkpoint generates `cfg.curve_images_per_prompt` images per prompt
    and taste, on the first of the evaluation's seeds. `base_scored`: the base model's images
    from the evaluation and their sampler, reused when it is the run's. Over-optimisation shows
    as the proxy still rising while gold flattens or falls.
    """
    names = rewards.cluster_names
    seeds = cfg.seeds[: cfg.curve_images_per_prompt]
    curve = {"epochs": [], "reward_per_cluster": {n: [] for n in names}, "n_seeds": len(seeds)}
    curve["vendi_within_taste"] = []  # mean over tastes: how many looks each taste gets
    if gold_fn is not None:
        curve["gold_per_cluster"] = {n: [] for n in names}

    def add(epoch: int, s: Scored) -> None:
        curve["epochs"].append(epoch)
        within = [vendi_score(f) for f in s.features.values()]
        curve["vendi_within_taste"].append(sum(within) / len(within))
        for k, n in enumerate(names):
            curve["reward_per_cluster"][n].append(s.for_cluster(s.learned, k, names).mean().item())
            if gold_fn is not None:
                curve["gold_per_cluster"][n].append(s.for_cluster(s.gold, k, names).mean().item())

    first = CheckpointInfo.read(series[0][1])
    run_settings = resolve_settings(cfg.sampling, first.trained, f"checkpoint {first.path}")
    if base_scored is not None and _same_sampler(base_scored[1], run_settings):
        rows = _first_seeds(len(cfg.prompts), len(cfg.seeds), len(seeds))
        add(0, base_scored[0].subset(rows))
    else:
        base_policy = TastePolicy.from_pretrained(
            base, device=device, dtype=cfg.dtype, compile_unet=cfg.compile_unet
        )
        images = generate_per_taste(base_policy, rewards, cfg, run_settings, seeds)
        add(0, score_images(images, rewards, gold_fn))
        del base_policy
    policy = None  # one pipeline for the whole run; each checkpoint swaps its weights in
    for epoch, path in tqdm(series, desc="checkpoints", disable=not progress, leave=False):
        if policy is None:
            policy = TastePolicy.from_pretrained(
                base, path, device=device, dtype=cfg.dtype, compile_unet=cfg.compile_unet
            )
        else:
            policy.load_checkpoint(path)
        images = generate_per_taste(policy, rewards, cfg, policy.settings(cfg.sampling), seeds)
        add(epoch, score_images(images, rewards, gold_fn))
    return curve


# --------------------------------------------------------------------------------- all together
def _headline(metrics: dict, baseline: str) -> str:
    """The policy the report puts against the baseline: 'matched' if evaluated, else the first
    taste-conditioned policy, else the best worst-off cluster."""
    policies = metrics["policies"]
    if "matched" in policies:
        return "matched"
    for name, m in policies.items():
        if m["tastes"] != [NO_TASTE]:
            return name
    others = [n for n in policies if n not in (baseline, "base")] or [baseline]
    key = (
        "worst_cluster_gold"
        if "worst_cluster_gold" in policies[others[0]]
        else "worst_cluster_reward"
    )
    return max(others, key=lambda n: policies[n][key])


def evaluate_policies(
    base: str,
    policies: dict[str, Path | None],
    rewards: TasteRewards,
    cfg: EvalConfig,
    gold_fn=None,
    baseline: str = "mean",
    curves: dict[str, Path] | None = None,
    device="cpu",
    progress: bool = True,
    lotteries: dict[str, tuple[str, torch.Tensor]] | None = None,
) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Generate with every policy (the base model always included) on the same prompts and
    seeds and measure them; returns (metrics, images per policy and taste).

    policies: name -> checkpoint dir (None = the base model). baseline: the policy every other
    is compared with per (prompt, seed). curves: name -> a training run's checkpoints folder, for
    the over-optimisation curve of that policy. Each policy samples as it was trained (unless
    `cfg.sampling` overrides a value); the base model as the first trained policy.
    lotteries: name -> (a taste-matched policy among `policies`, shares [K]): a taste-blind
    policy whose image for each (prompt, seed) is that policy's image for a cluster drawn by
    the shares (`plural_diffusion.lottery`), measured like any taste-blind policy.
    """
    policies = {"base": None, **policies}
    if baseline not in policies:
        raise UserError(
            f"baseline policy {baseline!r} is not evaluated (policies: {', '.join(policies)}); "
            f"add --policy {baseline}=CHECKPOINT_DIR or choose another --baseline"
        )
    names = rewards.cluster_names
    series = {name: checkpoint_series(path) for name, path in (curves or {}).items()}
    trained = [CheckpointInfo.read(p) for p in policies.values() if p is not None]
    reference = trained[0] if trained else None
    base_settings = resolve_settings(
        cfg.sampling,
        None if reference is None else reference.trained,
        "default" if reference is None else f"checkpoint {reference.path}",
    )
    metrics: dict = {
        "clusters": {
            "names": names,
            "shares": [round(float(s), 4) for s in rewards.cluster_shares],
        },
        "eval": {
            "prompts": list(cfg.prompts),
            "seeds": cfg.seeds,
            "steps": base_settings.sampling.steps,
            "guidance": base_settings.sampling.guidance_scale,
            "eta": base_settings.sampling.eta,
            "sampling": base_settings.describe(),
            "baseline": baseline,
            "gold": gold_fn is not None,
        },
        "policies": {},
    }
    scored: dict[str, Scored] = {}
    bar = tqdm(policies.items(), desc="policies", disable=not progress)
    for name, checkpoint in bar:
        bar.set_postfix(policy=name)
        policy = TastePolicy.from_pretrained(
            base, checkpoint, device=device, dtype=cfg.dtype, compile_unet=cfg.compile_unet
        )
        settings = base_settings if checkpoint is None else policy.settings(cfg.sampling)
        if not _same_sampler(settings, base_settings):
            warnings.warn(
                f"policy {name!r} was trained with another sampler than {reference.path} "
                f"({settings.describe()}); each policy samples as it was trained",
                stacklevel=2,
            )
        images = generate_per_taste(policy, rewards, cfg, settings, progress=progress)
        del policy
        scored[name] = score_images(images, rewards, gold_fn)
        metrics["policies"][name] = {
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "sampling": settings.describe(),
            **_metrics_of(scored[name], names),
        }
        if checkpoint is not None and (experts := CheckpointInfo.read(checkpoint).experts_from):
            metrics["policies"][name]["experts_from"] = experts
    for name, (source, shares) in (lotteries or {}).items():
        from plural_diffusion.lottery import lottery_images  # lottery imports this module

        if source not in scored or not scored[source].matched:
            raise UserError(
                f"lottery {name!r} draws from {source!r}, which is not an evaluated "
                "taste-matched policy"
            )
        images, made_for = lottery_images(
            scored[source].images, shares, names, len(cfg.prompts), seed=cfg.seed
        )
        scored[name] = score_images({NO_TASTE: images}, rewards, gold_fn)
        metrics["policies"][name] = {
            "checkpoint": metrics["policies"][source]["checkpoint"],
            "lottery": {
                "of": source,
                "shares": dict(zip(names, (round(float(x), 4) for x in shares))),
                "made_for": made_for,
            },
            "sampling": metrics["policies"][source]["sampling"],
            **_metrics_of(scored[name], names),
        }
    for name, s in scored.items():
        metrics["policies"][name]["win_rate"] = {
            "baseline": baseline,
            **win_rates(s, scored[baseline], names),
        }

    headline = _headline(metrics, baseline)
    metrics["headline"] = {"policy": headline, "baseline": baseline}
    for key in ("cross_taste_gold", "cross_taste_reward"):
        if key in metrics["policies"][headline]:
            metrics[key] = metrics["policies"][headline][key]
    if "cross_taste_reward" in metrics:
        metrics["cross_taste_policy"] = headline
        matrix = metrics.get("cross_taste_gold", metrics["cross_taste_reward"])
        metrics["cross_taste_diagonal_dominance"] = diagonal_dominance(matrix)

    if series:
        metrics["overoptimisation"] = {}
        base_scored = (scored["base"], base_settings)
        for name, steps in series.items():
            metrics["overoptimisation"][name] = overoptimisation_curve(
                base, steps, rewards, cfg, gold_fn, base_scored, device, progress
            )
    return metrics, {name: s.images for name, s in scored.items()}
