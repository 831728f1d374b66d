"""Evaluate policies side by side: per-cluster reward, worst cluster, cross-taste matrix, diversity.

Every policy generates from the same prompts and the same initial noise. A taste-conditioned
policy generates one set per taste cluster; a taste-blind one (base, mean, maxmin) generates one
set that every cluster judges. Scores come from the learned heads and, where the world knows
them (the toy world), from the gold utilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from plural_diffusion.backbone import load_checkpoint, load_pipeline
from plural_diffusion.rewards import TasteRewards
from plural_diffusion.sampling import SamplingConfig, sample


@dataclass
class EvalConfig:
    prompts: list[str] = field(default_factory=lambda: ["an image of one circle"])
    images_per_prompt: int = 8  # per prompt and taste; the same seeds for every policy
    seed: int = 1234
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def vendi_score(features: torch.Tensor) -> float:
    """Vendi score of L2-normalised features [N, D]: the effective number of distinct items,
    exp(entropy of the eigenvalues of the cosine-similarity matrix / N); 1 = all identical."""
    x = torch.nn.functional.normalize(features.double(), dim=1)
    eig = torch.linalg.eigvalsh(x @ x.T / x.shape[0]).clamp(min=0)
    eig = eig[eig > 1e-12]
    return float(torch.exp(-(eig * eig.log()).sum()))


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean cosine distance between distinct items of [N, D] features."""
    x = torch.nn.functional.normalize(features.double(), dim=1)
    n = x.shape[0]
    sim = x @ x.T
    return float((1 - sim).sum() / (n * (n - 1))) if n > 1 else 0.0


@torch.no_grad()
def generate(
    base: str, checkpoint: Path | None, rewards: TasteRewards, cfg: EvalConfig, device="cpu"
) -> dict[str, torch.Tensor]:
    """Images per taste: {cluster name: [P * n, 3, H, W]} for a taste-conditioned checkpoint,
    {"none": ...} for a taste-blind one (None = the base model)."""
    pipe = load_pipeline(base, device=device)
    conditioner = None
    if checkpoint is not None:
        _, conditioner = load_checkpoint(checkpoint, pipe.unet)
        if conditioner is not None:
            conditioner = conditioner.to(device)
            conditioner.attach(pipe.unet)
    n, prompts = cfg.images_per_prompt, cfg.prompts
    embeds, negative = pipe.encode_prompt(prompts, device, n, True, [""] * len(prompts))
    unet = pipe.unet
    shape = (len(prompts) * n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    tastes = {"none": None}
    if conditioner is not None:
        tastes = {name: rewards.cluster_tastes[k] for k, name in enumerate(rewards.cluster_names)}
    out = {}
    for name, z in tastes.items():
        zb = None if z is None else z.expand(shape[0], -1)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        traj = sample(unet, conditioner, pipe.vae, pipe.scheduler, embeds, negative, zb,
                      cfg.sampling, generator=g, init_latents=noise)  # fmt: skip
        out[name] = traj.images.cpu()
    return out


@torch.no_grad()
def policy_metrics(images: dict[str, torch.Tensor], rewards: TasteRewards, gold_fn=None) -> dict:
    """Figures of one policy from its images per taste (see `generate`)."""
    names = rewards.cluster_names
    matched = list(images) != ["none"]
    feats = {t: rewards.features(x) for t, x in images.items()}
    learned = {t: rewards.cluster_scores(f) for t, f in feats.items()}  # [N, K] per taste
    gold = {t: gold_fn(x) for t, x in images.items()} if gold_fn is not None else None

    def for_cluster(table, k):
        return table[names[k] if matched else "none"][:, k].mean().item()

    m = {
        "tastes": list(images),
        "reward_per_cluster": {n: for_cluster(learned, k) for k, n in enumerate(names)},
        "vendi": vendi_score(torch.cat(list(feats.values()))),
        "mean_pairwise_distance": mean_pairwise_distance(torch.cat(list(feats.values()))),
        "vendi_within_taste": {t: vendi_score(f) for t, f in feats.items()},
    }
    if gold is not None:
        m["gold_per_cluster"] = {n: for_cluster(gold, k) for k, n in enumerate(names)}
        m["worst_cluster_gold"] = min(m["gold_per_cluster"].values())
        if matched:
            m["cross_taste_gold"] = [gold[t].mean(dim=0).tolist() for t in names]
    return m


def diagonal_dominance(matrix: list[list[float]]) -> dict:
    """Whether each row's (generated-for) diagonal beats its off-diagonals, and per column
    (scored-by) whether the images made for that cluster score highest with it."""
    m = torch.tensor(matrix)
    k = m.shape[0]
    rows = [bool(m[i, i] > torch.cat([m[i, :i], m[i, i + 1 :]]).max()) for i in range(k)]
    cols = [bool(m[i, i] > torch.cat([m[:i, i], m[i + 1 :, i]]).max()) for i in range(k)]
    return {"by_column": cols, "all_columns": all(cols), "by_row": rows}
