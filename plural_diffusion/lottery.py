"""The egalitarian lottery: a taste-blind policy made of a taste-matched one.

A taste-blind policy cannot give every cluster its ideal when their ideals conflict; the best it
can do for the worst-off cluster is a *varied* policy, a share of its images for each taste. The
matched policy already has one look per cluster, so the taste-blind policy that raises the
worst-off cluster furthest is a lottery over those looks: each image is made for cluster j with
probability p_j, by the matched policy asked for j. The shares p solve a linear programme on the
learned heads (never on gold):

    maximise  min_k  (sum_j p_j R[j, k] - lo[k]) / (hi[k] - lo[k])   over the simplex

R [K, K] the mean utility for cluster k (columns) of the images made for cluster j (rows), b [K]
the base model's, each measured on calibration seeds that the evaluation does not use; lo[k] and
hi[k] the least and the most that cluster k gets from any of those image sets (the base's and
each cluster's). Each cluster's utility is counted as its place in its own range, so the heads'
different scales do not decide who is worst off. The range, not the gain over the base: on a base
that already makes one cluster's ideal (seed 12's all-noir base), that cluster cannot gain, and a
maxmin of gains would give it every image to spare it a loss, leaving the others nothing.

    fitted = fit_lottery(base_dir, matched_dir, rewards, prompts, seeds)   # shares and figures
    images = lottery_images(per_taste_images, fitted["shares"], names, n_prompts)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from plural_diffusion.evaluate import policy_tastes, score_images
from plural_diffusion.generate import generate_images
from plural_diffusion.policy import SamplingOverrides, TastePolicy
from plural_diffusion.rewards import TasteRewards
from reward_models.errors import UserError
from reward_models.io import read_json


def egalitarian_shares(cross_reward: torch.Tensor, base_reward: torch.Tensor) -> torch.Tensor:
    """The lottery's shares [K] (see the module's docstring): cross_reward [K, K] (rows: made
    for, columns: scored by), base_reward [K]."""
    from scipy.optimize import linprog

    r = torch.as_tensor(cross_reward, dtype=torch.float64)
    b = torch.as_tensor(base_reward, dtype=torch.float64)
    k = r.shape[0]
    if r.shape != (k, k) or b.shape != (k,):
        raise UserError(f"cross rewards {tuple(r.shape)} and base rewards {tuple(b.shape)} differ")
    if k < 2:
        raise UserError(
            "an egalitarian lottery needs at least 2 taste clusters; with one, use objective=mean"
        )
    if not (torch.isfinite(r).all() and torch.isfinite(b).all()):
        raise UserError("the lottery's utilities are not finite (NaN or inf rewards)")
    gain = _place_in_range(r, b, r).numpy()  # [K (made for), K (scored by)]
    # variables (p_1..p_K, t): maximise t s.t. t <= sum_j p_j gain[j, k] for every k
    cost = np.zeros(k + 1)
    cost[-1] = -1.0
    upper = np.hstack([-gain.T, np.ones((k, 1))])
    solved = linprog(
        cost,
        A_ub=upper,
        b_ub=np.zeros(k),
        A_eq=np.hstack([np.ones((1, k)), np.zeros((1, 1))]),
        b_eq=[1.0],
        bounds=[(0, 1)] * k + [(None, None)],
        method="highs",
    )
    if not solved.success:  # cannot happen for a bounded, feasible programme; say so if it does
        raise RuntimeError(f"the lottery's linear programme failed: {solved.message}")
    p = torch.tensor(solved.x[:k], dtype=torch.float32).clamp(min=0)
    return p / p.sum()


def _place_in_range(values: torch.Tensor, base: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """values [..., K] as each cluster's place between the least and the most it gets from the
    base's images (base [K]) and each cluster's (cross [K, K]): 0 the least, 1 the most."""
    lo = torch.minimum(base, cross.min(dim=0).values)
    hi = torch.maximum(base, cross.max(dim=0).values)
    return (values - lo) / (hi - lo).clamp(min=1e-6)


def lottery_counts(n: int, shares: torch.Tensor) -> list[int]:
    """n images split by `shares` [K] into whole numbers (largest remainders), summing to n."""
    exact = shares.double() * n
    counts = exact.floor().long()
    order = torch.argsort(exact - counts, descending=True)
    counts[order[: n - int(counts.sum())]] += 1
    return counts.tolist()


def lottery_draw(
    n_prompts: int, per_prompt: int, shares: torch.Tensor, seed: int = 0
) -> torch.Tensor:
    """The cluster each (prompt, seed) image is made for, [P, S]: per prompt `lottery_counts` of
    the S seeds for each cluster, their places shuffled by `seed` (stratified, so a few images
    hold each cluster's share rather than a binomial draw of it)."""
    g = torch.Generator().manual_seed(seed)
    counts = lottery_counts(per_prompt, shares)
    drawn = torch.cat([torch.full((c,), j) for j, c in enumerate(counts)])
    return torch.stack([drawn[torch.randperm(per_prompt, generator=g)] for _ in range(n_prompts)])


def read_lottery(path: str | Path, cluster_names: Sequence[str]) -> torch.Tensor:
    """The shares [K] of a lottery file (`lottery.json` from the demo, `lottery-NAME.json` from
    `evaluate --lottery`), checked against the reward run's clusters."""
    record = read_json(path)
    shares, clusters = record.get("shares"), record.get("clusters")
    if not isinstance(shares, list) or clusters != list(cluster_names):
        raise UserError(
            f"{path}: not a lottery over this reward run's clusters {list(cluster_names)} "
            "(expected 'clusters' and 'shares', as `plural-diffusion demo` writes them)"
        )
    p = torch.tensor(shares, dtype=torch.float32)
    if len(p) != len(clusters) or not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise UserError(
            f"{path}: shares {shares} are not a distribution over {len(clusters)} clusters"
        )
    return p / p.sum()


def lottery_images(
    per_taste: dict[str, torch.Tensor],
    shares: torch.Tensor,
    names: Sequence[str],
    n_prompts: int,
    seed: int = 0,
) -> tuple[torch.Tensor, list[str]]:
    """The lottery's images from a matched policy's images per cluster ({name: [P * S, ...]},
    prompt-major, the same seeds for every cluster): image (prompt, seed) is the one made for the
    cluster `lottery_draw` drew for it. Returns the images [P * S, ...] and the cluster each was
    made for."""
    missing = [n for n in names if n not in per_taste]
    if missing:
        raise UserError(f"the lottery needs images made for every cluster; missing {missing}")
    total = per_taste[names[0]].shape[0]
    if total % n_prompts:
        raise UserError(f"{total} images do not split into {n_prompts} prompts")
    per_prompt = total // n_prompts
    drawn = lottery_draw(n_prompts, per_prompt, shares, seed).flatten().tolist()
    rows = [per_taste[names[j]][i] for i, j in enumerate(drawn)]
    return torch.stack(rows), [names[j] for j in drawn]


@torch.no_grad()
def fit_lottery(
    base: str | Path,
    checkpoint: str | Path,
    rewards: TasteRewards,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampling: SamplingOverrides | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> dict:
    """The lottery over a matched policy's clusters: generate on `seeds` (calibration seeds, not
    the evaluation's) for each cluster's centroid taste and with the base model, score with the
    learned heads, solve for the shares. Returns a JSON-ready dict: shares, the matrices it came
    from, and each cluster's place in its range under the lottery (`gain`; the least, `min_gain`)."""
    names = rewards.cluster_names
    overrides = sampling or SamplingOverrides()
    policy = TastePolicy.from_pretrained(str(base), str(checkpoint), device=device)
    if policy.conditioner is None:
        raise UserError(
            f"{checkpoint} is a taste-blind policy; the lottery draws from a taste-matched one "
            "(objective=matched)"
        )
    settings = policy.settings(overrides)
    made = generate_images(
        policy, list(prompts), policy_tastes(policy, rewards), list(seeds), settings, batch_size
    )
    del policy
    blind = TastePolicy.from_pretrained(str(base), None, device=device)
    plain = generate_images(
        blind, list(prompts), policy_tastes(blind, rewards), list(seeds), settings, batch_size
    )

    def utilities(images: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] -> mean [K]
        return score_images({"x": images}, rewards).learned["x"].mean(dim=0)

    cross = torch.stack([utilities(made[k].flatten(0, 1)) for k in range(len(names))])
    base_reward = utilities(plain[0].flatten(0, 1))
    shares = egalitarian_shares(cross, base_reward)
    gain = _place_in_range(shares @ cross, base_reward, cross)
    return {
        "of": str(checkpoint),
        "clusters": list(names),
        "shares": [round(float(s), 4) for s in shares],
        "cross_reward": cross.tolist(),
        "base_reward": base_reward.tolist(),
        "gain": gain.tolist(),
        "min_gain": float(gain.min()),
        "seeds": list(seeds),
        "prompts": list(prompts),
    }
