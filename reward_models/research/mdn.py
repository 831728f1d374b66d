"""Mixture-density head: K Gaussian components over an image's score, from one network.

    head = build_head(MDNHeadConfig(feature_dim=512, n_components=3))
    fit_mdn(head, scores=ScoreSet(...), cfg=MDNTrainConfig())
    head.score(features, z=F.one_hot(k, 3).float().expand(B, -1))   # component k's mean, [B]
    head.score(features)                                            # the mixture's mean, [B]

For each image the network outputs K (mean, sd, weight) triples: the distribution of scores a
random rater would give it, one mode per taste when tastes conflict. Scores are standardised
within each rater before fitting (centred on the rater's own mean and divided by their own sd:
raters are harsh or generous, narrow or wide), so component means are in units of a rater's
spread.

Two likelihoods (`MDNTrainConfig.grouping`):
- "rating": the classic MDN, every rating an independent draw from the image's mixture. It needs
  no rater ids, but a component is then only defined image by image: where two tastes' modes
  cross, "component 1" may be one taste's mode on dark images and the other's on bright ones.
- "rater" (default): all ratings of one rater come from one component, p(ratings of r) =
  sum_k w_rk prod_i N(s_ri | mu_k(x_i), sd_k(x_i)), with w_rk the mean of the image weights over
  r's images. Tying a rater's ratings to one component is what makes components line up with
  taste clusters (measured in benchmarks/few_shot_toy.py). It is a mixture over raters, so it has
  EM's local optima: training starts from the same k-means start as `reward_models.research.mixture`
  (held fixed for the first quarter of the epochs). On the toy world with 60 raters that start
  found the gold clusters from 3 of 3 seeds, an unstarted fit from 0 of 3 (it split the
  largest cluster and merged the two others).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from reward_models.errors import UserError
from reward_models.heads import RewardHead, register_head
from reward_models.research.mixture import ridge_kmeans_responsibilities
from reward_models.train import ScoreSet


@dataclass
class MDNHeadConfig:
    kind: Literal["mdn"] = "mdn"
    feature_dim: int = 768
    n_components: int = 3
    hidden_dims: tuple[int, ...] = (128, 64)
    activation: Literal["gelu", "relu"] = "gelu"
    dropout: float = 0.0
    min_sd: float = 0.05  # floor on component sd, in score points: keeps the NLL bounded


@register_head
class MDNHead(RewardHead):
    """features [B, D] -> K components (mean, sd, weight) per image; z selects a component."""

    kind = "mdn"
    config_class = MDNHeadConfig

    def __init__(self, config: MDNHeadConfig):
        super().__init__(config)
        if config.n_components < 1 or not config.hidden_dims or config.min_sd <= 0:
            raise UserError(
                "mdn head needs n_components >= 1, at least one hidden layer and min_sd > 0 "
                f"(got {config.n_components}, {list(config.hidden_dims)}, {config.min_sd})"
            )
        dims = [config.feature_dim, *config.hidden_dims]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [
                nn.Linear(d_in, d_out),
                nn.GELU() if config.activation == "gelu" else nn.ReLU(),
            ]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
        self.trunk = nn.Sequential(*layers)
        self.out = nn.Linear(dims[-1], 3 * config.n_components)
        # spread the initial means so the components do not start as copies of one another
        with torch.no_grad():
            self.out.bias[: config.n_components] = torch.linspace(-1, 1, config.n_components)

    @property
    def taste_dim(self) -> int:
        """z is a weight vector over the K components (one-hot reads one component)."""
        return self.config.n_components

    def components(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image mixture: mean, sd (score points), log_weight, each [B, K]."""
        self.check_features(features)
        mean, raw_sd, logits = self.out(self.trunk(features)).chunk(3, dim=-1)
        sd = F.softplus(raw_sd) + self.config.min_sd
        return mean, sd, logits.log_softmax(-1)

    def score(self, features: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """sum_k z_k mu_k(x) for z [B, K] (one-hot: component k); None: the mixture mean. [B]."""
        mean, _, log_w = self.components(features)
        if z is None:
            return (log_w.exp() * mean).sum(-1)
        if z.shape != mean.shape:
            raise UserError(
                f"mdn head expects z of shape [{mean.shape[0]}, {mean.shape[1]}] (a weight per "
                f"component, e.g. one-hot), got {tuple(z.shape)}"
            )
        return (z.to(mean.dtype) * mean).sum(-1)

    def log_prob(self, features: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """log N(score | mu_k(x), sd_k(x)) per component (weights not included), [B, K]."""
        mean, sd, _ = self.components(features)
        return torch.distributions.Normal(mean, sd).log_prob(score[:, None])


@dataclass
class MDNTrainConfig:
    grouping: Literal["rater", "rating"] = "rater"  # see the module docstring
    epochs: int = 200
    raters_per_batch: int = 16  # grouping="rater": batches are whole raters
    batch_size: int = 512  # grouping="rating"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    # grouping="rater" starts from these rater responsibilities, held fixed for the first
    # warm_start_fraction of the epochs: "ridge_kmeans" (as EM's start, reward_models.research.mixture)
    # or "none". Without a start, 60 ratings per rater make responsibilities hard from the first
    # step and the component that starts best takes every rater
    init: Literal["ridge_kmeans", "none"] = "ridge_kmeans"
    warm_start_fraction: float = 0.25
    # grouping="rater": over this fraction of the epochs, each rater's log-likelihood is scaled
    # by beta rising geometrically from 1 / (ratings per rater) to 1 (deterministic annealing)
    anneal_fraction: float = 0.0
    seed: int = 0
    progress: bool = False


def standardised_scores(scores: ScoreSet) -> torch.Tensor:
    """Each score as a z-score within its rater's own ratings, [N] (0 for a rater with one score).

    Removes harsh/generous offsets and narrow/wide scales.
    """
    raters, inverse = scores.rater.unique(return_inverse=True)
    s = scores.score.float()
    counts = torch.zeros(len(raters)).index_add_(0, inverse, torch.ones(len(inverse)))
    mean = torch.zeros(len(raters)).index_add_(0, inverse, s) / counts
    centred = s - mean[inverse]
    var = torch.zeros(len(raters)).index_add_(0, inverse, centred**2) / (counts - 1).clamp(min=1)
    return centred / var.sqrt().clamp(min=1e-6)[inverse]


def rater_log_likelihood(head: MDNHead, scores: ScoreSet) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(all of rater r's centred ratings | component k) + log w_rk, [R', K], and raters [R'].

    Rows follow `raters` (the sorted distinct rater indices of `scores`); a softmax over k gives
    each rater's responsibility of each component, its argmax the rater's component.
    """
    raters, inverse = scores.rater.unique(return_inverse=True)
    features = scores.features if scores.item is None else scores.features[scores.item]
    log_p = head.log_prob(features, standardised_scores(scores))  # [N, K]
    _, _, log_w = head.components(features)
    K = log_p.shape[1]
    total = torch.zeros(len(raters), K).index_add(0, inverse, log_p)
    w = torch.zeros(len(raters), K).index_add(0, inverse, log_w.exp())
    counts = torch.zeros(len(raters)).index_add_(0, inverse, torch.ones(len(inverse)))
    return total + (w / counts[:, None]).log(), raters


def fit_mdn(head: MDNHead, scores: ScoreSet, cfg: MDNTrainConfig | None = None) -> list[float]:
    """Fit the mixture by maximum likelihood (Adam); returns the mean NLL per rating per epoch."""
    cfg = cfg or MDNTrainConfig()
    if not isinstance(head, MDNHead):
        raise UserError(f"fit_mdn trains mdn heads, got a {head.kind} head")
    if scores.features.shape[-1] != head.feature_dim or not torch.isfinite(scores.score).all():
        raise UserError(
            f"scores: need finite scores and {head.feature_dim}-dim features, got features of "
            f"shape {tuple(scores.features.shape)}"
        )
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    target = standardised_scores(scores)
    features = scores.features.float()
    item = torch.arange(len(target)) if scores.item is None else scores.item.long()
    raters = scores.rater.unique()
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    head.train()
    n_per_rater = len(target) / len(raters)
    anneal_epochs = max(1, int(cfg.anneal_fraction * cfg.epochs))
    warm_epochs = int(cfg.warm_start_fraction * cfg.epochs) if cfg.init != "none" else 0
    if warm_epochs and cfg.grouping == "rater":
        start = ridge_kmeans_responsibilities(scores, None, head.config.n_components, cfg.seed)
    for epoch in tqdm(range(cfg.epochs), desc="fit mdn head", disable=not cfg.progress):
        beta = n_per_rater ** (min(epoch / anneal_epochs, 1.0) - 1.0)  # 1/n -> 1
        total, n = 0.0, 0
        if cfg.grouping == "rating":
            order = torch.randperm(len(target), generator=g)
            batches = order.split(cfg.batch_size)
        else:
            order = raters[torch.randperm(len(raters), generator=g)]
            batches = [
                torch.isin(scores.rater, b).nonzero()[:, 0]
                for b in order.split(cfg.raters_per_batch)
            ]
        for rows in batches:
            if cfg.grouping == "rating":
                x = features[item[rows]]
                _, _, log_w = head.components(x)
                nll = -torch.logsumexp(head.log_prob(x, target[rows]) + log_w, dim=-1).sum()
            else:
                sub = ScoreSet(features, scores.rater[rows], scores.score[rows], item[rows])
                ll, batch_raters = rater_log_likelihood(head, sub)
                if epoch < warm_epochs:  # complete-data likelihood under the fixed start
                    nll = -(start[batch_raters] * ll).sum()
                else:
                    nll = -torch.logsumexp(beta * ll, dim=-1).sum() / beta
            loss = nll / len(rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, n = total + nll.item(), n + len(rows)
        losses.append(total / n)
    head.eval()
    if not math.isfinite(losses[-1]):
        raise UserError("mdn training diverged (NaN loss); lower lr or raise min_sd")
    return losses
