"""EM mixture of reward heads over raters: taste groups found from who rated what, not given.

    mixture = fit_em(scores=ScoreSet(...), pairs=PairSet(...), cfg=EMConfig(n_components=None))
    mixture.labels            # [R] the group of each rater (argmax responsibility)
    mixture.score(features, k)   # group k's utility, [B]
    mixture.save("runs/em"); HeadMixture.load("runs/em")

The model (MaxMin-RLHF's EM over users): each rater r belongs to one of K groups, group k has a
head f_k(x) (built by the head factory; a `MeanHeadConfig` by default) and a share pi_k.

- E-step: responsibility of group k for rater r, from the likelihood of *all* r's ratings,
  resp_rk ∝ pi_k * p(ratings of r | f_k).
- M-step: each head is refit (warm-started, full batch) on every rating weighted by its rater's
  responsibility; pi_k and the noise scales follow in closed form.

Likelihood of a rater's ratings under f_k. Scores: Gaussian residuals after profiling out the
rater's offset (harsh/generous raters), i.e. on (s_i - mean_r s) - (f_k(x_i) - mean_r f_k),
with sd sigma_k. Pairs: Bradley-Terry, P(a preferred) = sigmoid(t_k * (f_k(a) - f_k(b))), with a
learnt temperature t_k because f_k is in score points. K is given, or chosen by the held-out
likelihood of a fraction of each rater's ratings (`choose_k`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from reward_models.errors import UserError
from reward_models.heads import (
    MeanHeadConfig,
    RewardHead,
    build_head,
    load_head,
    save_head,
)
from reward_models.io import atomic_dir, read_json, write_json
from reward_models.train import PairSet, ScoreSet

MIXTURE_JSON = "mixture.json"


@dataclass
class EMConfig:
    n_components: int | None = 3  # None: choose K in 1..max_components by held-out likelihood
    max_components: int = 5
    iterations: int = 30
    min_iterations: int = 5  # the heads are refit a little each M-step; give them some
    # stop when no rater's responsibility moves by more than this in one iteration (the heads
    # are refit partially each M-step, so the likelihood itself creeps up for a long time)
    tol: float = 1e-3
    head: MeanHeadConfig = field(
        default_factory=lambda: MeanHeadConfig(hidden_dims=(64,), dropout=0.0)
    )
    m_step_steps: int = 40  # full-batch Adam steps per head per M-step
    lr: float = 3e-3
    weight_decay: float = 1e-4
    # "ridge_kmeans": k-means on each rater's ridge-regression taste direction (robust start);
    # "random": Dirichlet responsibilities
    init: Literal["ridge_kmeans", "random"] = "ridge_kmeans"
    holdout_fraction: float = 0.25  # of each rater's ratings, when choosing K
    # "one_se": the smallest K whose held-out likelihood is within one standard error (over
    # raters) of the best K's, so a split that gains less than the noise is not made (raters
    # of one taste differ a little, and a larger K can fit that); "max": the best K
    k_rule: Literal["one_se", "max"] = "one_se"
    seed: int = 0


@dataclass
class HeadMixture:
    """K heads, their shares and noise scales, and each rater's responsibilities."""

    heads: list[RewardHead]
    weights: torch.Tensor  # [K] pi_k
    sigma: torch.Tensor  # [K] score residual sd, in score points
    pair_temperature: torch.Tensor  # [K] Bradley-Terry t_k
    responsibilities: torch.Tensor  # [R, K], rows = rater indices 0..R-1 (0 for absent raters)
    log_likelihood: list[float] = field(default_factory=list)  # per rating, per iteration
    held_out: dict[int, float] = field(default_factory=dict)  # K -> held-out ll per rating

    @property
    def labels(self) -> torch.Tensor:
        """Most likely group of each rater, [R] long."""
        return self.responsibilities.argmax(-1)

    def score(self, features: torch.Tensor, k: int) -> torch.Tensor:
        """Group k's utility of each image, features [B, D] -> [B]."""
        if not 0 <= k < len(self.heads):
            raise UserError(f"group {k} out of range: the mixture has {len(self.heads)} groups")
        return self.heads[k].score(features, None)

    def save(self, directory: str | Path) -> None:
        """directory/mixture.json + head_k/ per group (each a `save_head` directory)."""
        with atomic_dir(directory) as tmp:
            for k, head in enumerate(self.heads):
                save_head(head, tmp / f"head_{k}")
            record = {
                name: getattr(self, name).tolist()
                for name in ("weights", "sigma", "pair_temperature", "responsibilities")
            }
            record.update(log_likelihood=self.log_likelihood, held_out=self.held_out)
            write_json(tmp / MIXTURE_JSON, record)

    @classmethod
    def load(cls, directory: str | Path) -> HeadMixture:
        directory = Path(directory)
        record = read_json(directory / MIXTURE_JSON)
        weights = torch.tensor(record["weights"])
        heads = [load_head(directory / f"head_{k}") for k in range(len(weights))]
        return cls(
            heads,
            weights,
            torch.tensor(record["sigma"]),
            torch.tensor(record["pair_temperature"]),
            torch.tensor(record["responsibilities"]),
            record.get("log_likelihood", []),
            {int(k): v for k, v in record.get("held_out", {}).items()},
        )


@dataclass
class _Data:
    """Ratings gathered once: score rows, pair rows, and each row's rater."""

    n_raters: int
    x: torch.Tensor | None = None  # [N, D] features of each scored image
    s: torch.Tensor | None = None  # [N] score
    s_rater: torch.Tensor | None = None  # [N]
    a: torch.Tensor | None = None  # [P, D]
    b: torch.Tensor | None = None  # [P, D]
    p_a: torch.Tensor | None = None  # [P] probability a preferred
    p_rater: torch.Tensor | None = None  # [P]

    def subset(self, score_rows: torch.Tensor | None, pair_rows: torch.Tensor | None) -> _Data:
        out = _Data(self.n_raters)
        if self.s is not None and score_rows is not None:
            out.x, out.s, out.s_rater = (
                self.x[score_rows],
                self.s[score_rows],
                self.s_rater[score_rows],
            )
        if self.p_a is not None and pair_rows is not None:
            out.a, out.b = self.a[pair_rows], self.b[pair_rows]
            out.p_a, out.p_rater = self.p_a[pair_rows], self.p_rater[pair_rows]
        return out

    @property
    def n_ratings(self) -> int:
        return (0 if self.s is None else len(self.s)) + (0 if self.p_a is None else len(self.p_a))


def _gather(scores: ScoreSet | None, pairs: PairSet | None) -> _Data:
    if scores is None and pairs is None:
        raise UserError("fit_em needs scores=ScoreSet(...), pairs=PairSet(...), or both")
    raters = [t.rater for t in (scores, pairs) if t is not None]
    data = _Data(int(max(int(r.max()) for r in raters if r.numel())) + 1)
    if scores is not None:
        item = torch.arange(len(scores.score)) if scores.item is None else scores.item
        data.x, data.s = scores.features[item].float(), scores.score.float()
        data.s_rater = scores.rater.long()
    if pairs is not None:
        data.a, data.b = pairs.features[pairs.idx_a].float(), pairs.features[pairs.idx_b].float()
        data.p_a, data.p_rater = 1.0 - pairs.winner.float(), pairs.rater.long()
    return data


def _per_rater(values: torch.Tensor, rater: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of values [N, ...] per rater -> [n, ...]."""
    return torch.zeros(n, *values.shape[1:], dtype=values.dtype).index_add(0, rater, values)


def _centred(v: torch.Tensor, rater: torch.Tensor, n: int) -> torch.Tensor:
    """v minus the mean of v over the same rater's rows, [N]."""
    counts = _per_rater(torch.ones_like(v), rater, n).clamp(min=1)
    return v - (_per_rater(v, rater, n) / counts)[rater]


def _log_lik(head, sigma, log_t, data: _Data) -> torch.Tensor:
    """log p(rater r's ratings | this head), [R]: offset-profiled Gaussian + Bradley-Terry."""
    total = torch.zeros(data.n_raters)
    if data.s is not None:
        resid = _centred(data.s, data.s_rater, data.n_raters) - _centred(
            head.score(data.x, None), data.s_rater, data.n_raters
        )
        # a rater's n residuals have n - 1 degrees of freedom once the offset is profiled out
        counts = _per_rater(torch.ones_like(resid), data.s_rater, data.n_raters)
        dof = (counts - 1).clamp(min=0)
        total = total + _per_rater(-0.5 * (resid / sigma) ** 2, data.s_rater, data.n_raters)
        total = total - dof * (torch.log(sigma) + 0.5 * math.log(2 * math.pi))
    if data.p_a is not None:
        logits = log_t.exp() * (head.score(data.a, None) - head.score(data.b, None))
        ll = -F.binary_cross_entropy_with_logits(logits, data.p_a, reduction="none")
        total = total + _per_rater(ll, data.p_rater, data.n_raters)
    return total


def _init_responsibilities(data: _Data, K: int, cfg: EMConfig) -> torch.Tensor:
    """[R, K] starting responsibilities (soft one-hot from k-means, or Dirichlet)."""
    if cfg.init == "random" or K == 1:
        return torch.distributions.Dirichlet(torch.ones(K)).sample((data.n_raters,))
    return _ridge_kmeans(data, K, cfg.seed)


def ridge_kmeans_responsibilities(
    scores: ScoreSet | None, pairs: PairSet | None, n_groups: int, seed: int = 0
) -> torch.Tensor:
    """Starting responsibilities [R, K] (rows: rater indices) from k-means on taste directions.

    A rater's direction is the ridge regression of their centred scores on centred features,
    plus their mean preferred-minus-rejected feature difference from pairs, L2-normalised; the
    k-means label becomes a soft one-hot (0.9 + 0.1/K on the label). Used to start EM here and
    the rater-grouped MDN (reward_models.research.mdn).
    """
    return _ridge_kmeans(_gather(scores, pairs), n_groups, seed)


def _ridge_kmeans(data: _Data, K: int, seed: int) -> torch.Tensor:
    dim = data.x.shape[1] if data.x is not None else data.a.shape[1]
    direction = torch.zeros(data.n_raters, dim)
    for r in range(data.n_raters):
        if data.s is not None and (m := data.s_rater == r).sum() > 1:
            x = data.x[m] - data.x[m].mean(0)
            s = data.s[m] - data.s[m].mean()
            direction[r] += torch.linalg.solve(x.T @ x + 1e-1 * torch.eye(dim), x.T @ s)
        if data.p_a is not None and (m := data.p_rater == r).any():
            sign = (2 * data.p_a[m] - 1)[:, None]
            direction[r] += (sign * (data.a[m] - data.b[m])).mean(0)
    direction = F.normalize(direction, dim=-1).numpy()
    labels = KMeans(n_clusters=K, n_init=10, random_state=seed).fit_predict(direction)
    return 0.9 * F.one_hot(torch.as_tensor(labels).long(), K).float() + 0.1 / K


def _m_step(head, sigma, log_t, resp_k: torch.Tensor, data: _Data, cfg: EMConfig):
    """Refit one head (and its pair temperature) on ratings weighted by resp_k [R]."""
    params = list(head.parameters()) + [log_t]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    head.train()
    for _ in range(cfg.m_step_steps):
        # dividing by the weighted rating count keeps the step size independent of K
        loss = -(resp_k * _log_lik(head, sigma, log_t, data)).sum() / max(data.n_ratings, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head.eval()
    if data.s is None:
        return sigma
    with torch.no_grad():  # closed-form sd of the offset-profiled residuals
        resid = _centred(data.s, data.s_rater, data.n_raters) - _centred(
            head.score(data.x, None), data.s_rater, data.n_raters
        )
        counts = _per_rater(torch.ones_like(resid), data.s_rater, data.n_raters)
        sq = _per_rater(resid**2, data.s_rater, data.n_raters)
        var = (resp_k * sq).sum() / (resp_k * (counts - 1).clamp(min=0)).sum().clamp(min=1e-6)
    return var.sqrt().clamp(min=1e-3)


def _em(data: _Data, K: int, feature_dim: int, cfg: EMConfig) -> HeadMixture:
    torch.manual_seed(cfg.seed)
    head_cfg = dataclasses.replace(cfg.head, feature_dim=feature_dim)
    heads = [build_head(head_cfg) for _ in range(K)]
    sigma = torch.ones(K)
    log_t = [torch.zeros((), requires_grad=True) for _ in range(K)]
    resp = _init_responsibilities(data, K, cfg)
    present = torch.zeros(data.n_raters, dtype=torch.bool)
    for r in (data.s_rater, data.p_rater):
        if r is not None:
            present[r] = True
    history: list[float] = []
    for _ in range(cfg.iterations):
        # M-step: heads, noise, temperatures and shares from the current responsibilities
        for k in range(K):
            sigma[k] = _m_step(heads[k], sigma[k], log_t[k], resp[:, k], data, cfg)
        weights = resp[present].mean(0)
        # E-step: each rater's responsibilities from the likelihood of all their ratings
        with torch.no_grad():
            ll = torch.stack([_log_lik(heads[k], sigma[k], log_t[k], data) for k in range(K)], 1)
            joint = ll + weights.clamp(min=1e-12).log()
            new_resp = torch.softmax(joint, dim=-1) * present[:, None]
            history.append(float(torch.logsumexp(joint[present], -1).sum()) / data.n_ratings)
        moved, resp = float((new_resp - resp).abs().max()), new_resp
        if moved < cfg.tol and len(history) >= cfg.min_iterations:
            break
    t = torch.stack([v.detach().exp() for v in log_t])
    return HeadMixture(heads, weights, sigma.detach(), t, resp, history)


def _holdout_split(data: _Data, fraction: float, seed: int) -> tuple[_Data, _Data]:
    """(fit, held-out): `fraction` of each rater's scores and of their pairs held out."""
    g = torch.Generator().manual_seed(seed)

    def split(rater: torch.Tensor | None):
        if rater is None:
            return None, None
        held = torch.zeros(len(rater), dtype=torch.bool)
        for r in rater.unique():
            rows = (rater == r).nonzero()[:, 0]
            rows = rows[torch.randperm(len(rows), generator=g)]
            held[rows[: max(0, min(round(fraction * len(rows)), len(rows) - 2))]] = True
        return (~held).nonzero()[:, 0], held.nonzero()[:, 0]

    (s_fit, s_held), (p_fit, p_held) = split(data.s_rater), split(data.p_rater)
    return data.subset(s_fit, p_fit), data.subset(s_held, p_held)


def _held_out_ll(mixture: HeadMixture, data: _Data) -> tuple[float, float]:
    """Mean log-likelihood per held-out rating (each rater's group mixed by its
    responsibilities) and its standard error over raters."""
    with torch.no_grad():
        ll = torch.stack(
            [
                _log_lik(h, s, t.log(), data)
                for h, s, t in zip(mixture.heads, mixture.sigma, mixture.pair_temperature)
            ],
            1,
        )
        mixed = torch.logsumexp(ll + mixture.responsibilities.clamp(min=1e-12).log(), -1)
    n = torch.zeros(data.n_raters)
    for rater in (data.s_rater, data.p_rater):
        if rater is not None:
            n = n + _per_rater(torch.ones(len(rater)), rater, data.n_raters)
    per_rater = (mixed / n.clamp(min=1))[n > 0]
    se = float(per_rater.std() / math.sqrt(len(per_rater))) if len(per_rater) > 1 else 0.0
    return float(mixed.sum()) / max(data.n_ratings, 1), se


def _choose_k(data: _Data, feature_dim: int, cfg: EMConfig) -> tuple[int, dict[int, float]]:
    """K by held-out likelihood, and the held-out log-likelihood per rating for every K tried."""
    fit, held = _holdout_split(data, cfg.holdout_fraction, cfg.seed)
    scores = {
        K: _held_out_ll(_em(fit, K, feature_dim, cfg), held)
        for K in range(1, cfg.max_components + 1)
    }
    best = max(scores, key=lambda K: scores[K][0])
    if cfg.k_rule == "max":
        return best, {K: v for K, (v, _) in scores.items()}
    # one-standard-error rule (Breiman et al. 1984): the smallest K within one SE of the best
    floor = scores[best][0] - scores[best][1]
    chosen = min(K for K, (v, _) in scores.items() if v >= floor)
    return chosen, {K: v for K, (v, _) in scores.items()}


def fit_em(
    scores: ScoreSet | None = None, pairs: PairSet | None = None, cfg: EMConfig | None = None
) -> HeadMixture:
    """Fit a K-group mixture of heads over raters by EM (K chosen when `n_components` is None)."""
    cfg = cfg or EMConfig()
    data = _gather(scores, pairs)
    feature_dim = (data.x if data.x is not None else data.a).shape[1]
    held_out: dict[int, float] = {}
    K = cfg.n_components
    if K is None:
        # fit on all but a fraction of each rater's ratings, score those, keep the best K
        K, held_out = _choose_k(data, feature_dim, cfg)
    if not 1 <= K <= data.n_raters:
        raise UserError(
            f"cannot fit {K} groups to {data.n_raters} raters; ask for 1..{data.n_raters}"
        )
    mixture = _em(data, K, feature_dim, cfg)
    mixture.held_out = held_out
    return mixture
