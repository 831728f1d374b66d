"""Evaluate a latent taste head: posterior-collapse diagnostics and few-shot protocols.

    diag = diagnose(head, scores, context_size=10)            # active units, conditioned - prior
    result = few_shot_eval(head, table, features_of, k=10)    # per test rater, adapt on k
    figures = few_shot_protocol(load_ratings(path, format="flickr_aes"), features_of)

`few_shot_protocol` is the FLICKR-AES personalised-aesthetics protocol (Ren et al., ICCV 2017)
end to end for any table `load_ratings` reads: split raters, train on the training raters, and
per test rater adapt on k of their images and test on the rest, averaged over test raters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from reward_models.data import RatingData, ScoreTable, few_shot, split_by_rater
from reward_models.errors import UserError
from reward_models.heads import build_head
from reward_models.metrics import pairwise_accuracy, spearman
from reward_models.research.latent import Context, LatentHead, LatentHeadConfig
from reward_models.research.latent_fit import (
    LatentTrainConfig,
    fit_latent,
    group_by_user,
    user_examples,
)
from reward_models.train import ScoreSet


@dataclass
class LatentDiagnostics:
    """Is z used? Posterior collapse shows as no active units and a zero accuracy gap."""

    context_size: int
    n_users: int
    active_units: int  # dims whose posterior mean varies across users by more than threshold
    mean_variance: list[float]  # [d] variance across users of the posterior mean, per dim
    posterior_variance: float  # mean posterior variance (1.0 = the prior)
    conditioned_accuracy: float  # pairwise accuracy on held-out targets, z = posterior mean
    unconditioned_accuracy: float  # the same with z = 0 (prior mean)

    @property
    def gap(self) -> float:
        return self.conditioned_accuracy - self.unconditioned_accuracy


@torch.no_grad()
def diagnose(
    head: LatentHead,
    scores: ScoreSet,
    context_size: int = 10,
    threshold: float = 0.01,
    seed: int = 0,
) -> LatentDiagnostics:
    """Posterior-collapse report on the users of `scores` (typically users unseen in training).

    Each user with > context_size + 1 scores gets a random context of `context_size` scores;
    accuracy is the pairwise accuracy of r(x, z) against the user's own held-out scores (offsets
    do not matter to it), averaged over users. `threshold` follows the VAE literature's 0.01
    (Burda et al. 2016) on the variance of posterior means, against a prior variance of 1.
    """
    users = group_by_user(scores, None, context_size + 2)
    if not users.ids:
        raise UserError(f"no user has more than {context_size + 1} scores to diagnose with")
    g = torch.Generator().manual_seed(seed)
    head.eval()
    means, variances, cond, uncond = [], [], [], []
    for rows in users.score_rows:
        perm = torch.randperm(len(rows), generator=g)
        ctx = user_examples(rows, rows[:0], perm[:context_size], scores, None)
        tgt = user_examples(rows, rows[:0], perm[context_size:], scores, None)
        post = head.infer(ctx)
        means.append(post.mean[0])
        variances.append(post.var[0])
        x = tgt.features.to(post.mean.device)
        cond.append(pairwise_accuracy(head.utility(x, post.mean), tgt.scores))
        uncond.append(pairwise_accuracy(head.utility(x, torch.zeros_like(post.mean)), tgt.scores))
    mean_var = torch.stack(means).var(0) if len(means) > 1 else torch.zeros_like(means[0])
    return LatentDiagnostics(
        context_size=context_size,
        n_users=len(means),
        active_units=int((mean_var > threshold).sum()),
        mean_variance=mean_var.tolist(),
        posterior_variance=float(torch.stack(variances).mean()),
        conditioned_accuracy=float(np.nanmean(cond)),
        unconditioned_accuracy=float(np.nanmean(uncond)),
    )


@dataclass
class FewShotResult:
    """Means over test raters of each metric, conditioned on k examples and at the prior."""

    k: int
    n_raters: int
    spearman: float
    pairwise_accuracy: float
    prior_spearman: float  # the same head with z = 0: what the k examples added
    prior_pairwise_accuracy: float
    per_rater: dict[str, tuple[float, float]]  # rater_id -> (spearman, pairwise accuracy)


@torch.no_grad()
def few_shot_eval(
    head: LatentHead,
    table: ScoreTable,
    features_of: Callable[[Sequence[str]], torch.Tensor],
    k: int = 10,
    raters: Sequence[str] | None = None,
    seed: int = 0,
    refine_steps: int = 0,
) -> FewShotResult:
    """The personalised-aesthetics protocol of FLICKR-AES (Ren et al., ICCV 2017), for any table.

    For each test rater (default: every rater of `table`, e.g. the test workers from
    `split_by_rater(load_ratings(path, format="flickr_aes"), ...)`): adapt on k of their rated
    images (`few_shot`, seeded), predict the rest, and score Spearman and pairwise accuracy
    against their own scores; the figures are averaged over raters. Raters with fewer than
    k + 2 ratings are skipped; `refine_steps` as in `LatentHead.infer`. `features_of(image names) -> [n, D]` looks up CLIP features,
    e.g. `lambda names: feats.matrix[feats.rows(names)]` with `workflow.Features`.
    """
    raters = list(raters) if raters is not None else table.rater_ids
    per_rater, prior = {}, []
    for rater in raters:
        if len(table.rows_of(str(rater))) < k + 2:
            continue
        context, target = few_shot(table, str(rater), k, seed)
        x_c = features_of(context.df["image"].tolist()).float()
        s_c = torch.tensor(context.scores, dtype=torch.float32)
        post = head.infer(Context(features=x_c, scores=s_c), refine_steps=refine_steps)
        x_t = features_of(target.df["image"].tolist()).float().to(post.mean.device)
        s_t = torch.tensor(target.scores, dtype=torch.float32)
        pred = head.utility(x_t, post.mean)
        base = head.utility(x_t, torch.zeros_like(post.mean))
        per_rater[str(rater)] = (spearman(pred, s_t), pairwise_accuracy(pred, s_t))
        prior.append((spearman(base, s_t), pairwise_accuracy(base, s_t)))
    if not per_rater:
        raise UserError(f"no rater in the table has at least k + 2 = {k + 2} ratings")
    cond = np.array(list(per_rater.values()))
    base = np.array(prior)
    return FewShotResult(
        k=k,
        n_raters=len(per_rater),
        spearman=float(np.nanmean(cond[:, 0])),
        pairwise_accuracy=float(np.nanmean(cond[:, 1])),
        prior_spearman=float(np.nanmean(base[:, 0])),
        prior_pairwise_accuracy=float(np.nanmean(base[:, 1])),
        per_rater=per_rater,
    )


def few_shot_protocol(
    data: RatingData,
    features_of: Callable[[Sequence[str]], torch.Tensor],
    head_cfg: LatentHeadConfig | None = None,
    train_cfg: LatentTrainConfig | None = None,
    ks: Sequence[int] = (10,),
    test_raters: float = 0.2,
    seed: int = 0,
    refine_steps: int = 0,
) -> dict[int, FewShotResult]:
    """Train a latent head on the training raters' scores, then `few_shot_eval` the test raters.

    `split_by_rater(data, test_raters, seed)` chooses the test raters (FLICKR-AES ships its own
    list of 37 test workers; pass a `data` restricted to those plus the training workers and
    pick `test_raters` to match, or call `few_shot_eval` on your own split). Returns k -> result.
    """
    if data.scores is None or len(data.scores) == 0:
        raise UserError("the few-shot protocol needs absolute scores; this data set has none")
    train, test = split_by_rater(data, test_raters, seed)
    table = train.scores
    images = table.images
    row = {name: i for i, name in enumerate(images)}
    raters = {r: i for i, r in enumerate(table.rater_ids)}
    scores = ScoreSet(
        features_of(images).float(),
        torch.tensor([raters[r] for r in table.df["rater_id"]]),
        torch.tensor(table.scores, dtype=torch.float32),
        torch.tensor([row[i] for i in table.df["image"]]),
    )
    head_cfg = dataclasses.replace(
        head_cfg or LatentHeadConfig(), feature_dim=scores.features.shape[1]
    )
    head = build_head(head_cfg)
    fit_latent(head, scores, None, train_cfg)
    return {
        k: few_shot_eval(head, test.scores, features_of, k=k, seed=seed, refine_steps=refine_steps)
        for k in ks
    }
