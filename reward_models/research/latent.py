"""Latent taste head (VPL-style): a user's few ratings -> a Gaussian posterior over taste z.

    head = build_head(LatentHeadConfig(feature_dim=512, taste_dim=8))
    fit_latent(head, scores=ScoreSet(...), pairs=PairSet(...))    # reward_models.research.latent_fit
    posterior = head.infer(Context(features=x_k, scores=s_k))      # a user never seen in training
    reward = head.score(features, posterior.mean.expand(len(features), -1))

A permutation-invariant set encoder maps each labelled example to a Gaussian "vote" on z, and the
votes are combined with the prior N(0, I) by precision weighting (Bayesian context aggregation,
Volpp et al., ICLR 2021):

    precision = 1 + sum_i lambda_i          mean = sum_i lambda_i * m_i / precision

so every added example can only shrink the posterior variance: a user with 2 ratings gets a
broad posterior, one with 50 a narrow one, and active querying (`latent_query`) has an honest
uncertainty to work with. A decoder r(x, z) (FiLM on the first hidden layer, as `RaterHead`)
scores images under a taste.

Scores are on each rater's own scale (harsh or generous), so neither side reads an absolute
score. The encoder sees each user's context scores centred on their own context mean, in units of
one global `score_scale`. The likelihood (`LatentHeadConfig.likelihood`) is offset-free:
- "bradley_terry" (default) compares every two images the user scored differently,
  P(i above j | z) = sigmoid(r(x_i, z) - r(x_j, z)); invariant to any monotone re-scaling of a
  user's scores, so harsh, generous and narrow raters all look alike to it;
- "centred_mse" is a Gaussian on scores centred on the user's own mean (in `score_scale` units,
  learnt noise); it keeps score magnitudes but assumes raters share a scale.
Pairwise choices always use Bradley-Terry on r(a) - r(b).

`infer(context, refine_steps=n)` adds n steps of gradient-based variational inference on the
context's own likelihood, started from the encoder's output (semi-amortised VI, Kim et al. 2018).
The encoder is trained on random contexts, and contexts picked by active querying are not
random; on the toy world refinement lifted accuracy from 5 ratings (0.863 -> 0.883 pairwise vs
gold) and kept actively queried users improving past 8 ratings, where the encoder alone
plateaued (0.922 vs 0.906 at 20; benchmarks/results/few_shot_toy.json).

With `reference_size > 0` (set by `set_reference`) `score` is bounded,

    score(x, z) = mean_j P(x beats x'_j | z) = mean_j sigmoid(r(x, z) - r(x'_j, z))  in [0, 1],

so rewards of different users share one scale for RL.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from reward_models.errors import UserError
from reward_models.heads import RewardHead, register_head


@dataclass
class LatentHeadConfig:
    """An encoder (examples -> posterior over z) and a decoder r(x, z)."""

    kind: Literal["latent"] = "latent"
    feature_dim: int = 768
    taste_dim: int = 8
    hidden_dims: tuple[int, ...] = (128, 64)  # decoder r(x, z)
    encoder_dim: int = 128  # width of each example's embedding in the set encoder
    activation: Literal["gelu", "relu"] = "gelu"
    dropout: float = 0.0
    likelihood: Literal["bradley_terry", "centred_mse"] = "bradley_terry"  # of scores
    # > 0: `score` is the bounded mean win probability against this many reference images,
    # stored with the head (see `set_reference`); 0: `score` is the raw utility r(x, z)
    reference_size: int = 0


@dataclass
class TastePosterior:
    """Diagonal Gaussian posteriors over taste for U users: mean, var [U, d]."""

    mean: torch.Tensor
    var: torch.Tensor

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n reparameterised draws, [n, U, d]."""
        eps = torch.randn((n, *self.mean.shape), generator=generator, dtype=self.mean.dtype)
        eps = eps.to(self.mean.device)
        return self.mean + self.var.sqrt() * eps

    def kl(self) -> torch.Tensor:
        """KL(posterior || N(0, I)) per user, [U] in nats."""
        return 0.5 * (self.var + self.mean**2 - 1.0 - self.var.log()).sum(-1)


@dataclass
class Context:
    """One user's labelled examples: scored images, pairwise choices, or both.

    features [n, D] with scores [n] on the user's own scale; features_a, features_b [m, D] with
    winner [m]: 0 when a was preferred, 1 when b was, 0.5 for a tie (as in `PairSet`).
    """

    features: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    features_a: torch.Tensor | None = None
    features_b: torch.Tensor | None = None
    winner: torch.Tensor | None = None

    def __len__(self) -> int:
        n = 0 if self.scores is None else self.scores.numel()
        return n + (0 if self.winner is None else self.winner.numel())


@dataclass
class ContextBatch:
    """Contexts of U users, padded: score_* [U, N(, D)], pair_* [U, M(, D)], masks bool."""

    score_x: torch.Tensor | None = None  # [U, N, D]
    score_s: torch.Tensor | None = None  # [U, N] raw scores
    score_mask: torch.Tensor | None = None  # [U, N]
    pair_a: torch.Tensor | None = None  # [U, M, D]
    pair_b: torch.Tensor | None = None  # [U, M, D]
    pair_y: torch.Tensor | None = None  # [U, M] winner (1 = b preferred)
    pair_mask: torch.Tensor | None = None  # [U, M]


def _mlp(dims: list[int], activation: str, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.GELU() if activation == "gelu" else nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [..., N] over the last dim where mask, [..., 1]; 0 where nothing is masked in."""
    m = mask.to(x.dtype)
    return (x * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)


@register_head
class LatentHead(RewardHead):
    """r(x, z) with a set encoder that infers z from a user's examples; see the module doc."""

    kind = "latent"
    config_class = LatentHeadConfig

    def __init__(self, config: LatentHeadConfig):
        super().__init__(config)
        if config.taste_dim < 1 or not config.hidden_dims or config.reference_size < 0:
            raise UserError(
                "latent head needs taste_dim >= 1, at least one hidden layer and "
                f"reference_size >= 0 (got taste_dim={config.taste_dim}, "
                f"hidden_dims={list(config.hidden_dims)}, reference_size={config.reference_size})"
            )
        D, d, E = config.feature_dim, config.taste_dim, config.encoder_dim
        hidden, act, drop = config.hidden_dims, config.activation, config.dropout
        # set encoder: each example -> embedding -> a Gaussian vote (mean m_i, precision lambda_i)
        # inputs carry the label-weighted feature explicitly (s * x; y * (x_a - x_b)): for a
        # linear taste their sum is the least-squares direction, and an MLP fed only [x, s]
        # must first learn that product, which left training on the chance plateau for
        # hundreds of steps on the +w/-w synthetic world
        self.score_encoder = _mlp([2 * D + 1, E, E], act, drop)  # [x, s, s * x]
        self.pair_encoder = _mlp([3 * D + 1, E, E], act, drop)  # [x_a, x_b, y, y * (x_a - x_b)]
        self.to_vote = nn.Sequential(nn.GELU(), nn.Linear(E, 2 * d))
        # decoder r(x, z): FiLM-modulated first layer, as RaterHead's default
        self.trunk = nn.Linear(D, hidden[0])
        self.film = nn.Linear(d, 2 * hidden[0])
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()
        self.body = _mlp([*hidden, 1], act, drop)
        # a training-set statistic (sd of raters' centred scores), set by fit_latent; saved
        self.register_buffer("score_scale", torch.ones(()))
        # noise sd of the centred-MSE likelihood, learnt (unused by the Bradley-Terry one)
        self.log_noise = nn.Parameter(torch.zeros(()))
        self.register_buffer("reference", torch.zeros(config.reference_size, D))

    # ---- decoder ---------------------------------------------------------------------------
    def utility(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Unbounded utility r(x, z): features [..., D], z [..., d] (broadcast) -> [...]."""
        gamma, beta = self.film(z).chunk(2, dim=-1)
        h = self.trunk(features) * (1 + gamma) + beta
        return self.body(self.act(h)).squeeze(-1)

    def score(self, features: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Reward of each image for taste z: features [B, D], z [B, d] or None -> [B].

        None is the prior mean z = 0 (no user information). Bounded to [0, 1] when the head
        holds a reference set, the raw utility otherwise.
        """
        self.check_features(features)
        if z is None:
            z = features.new_zeros(features.shape[0], self.taste_dim)
        if z.shape != (features.shape[0], self.taste_dim):
            raise UserError(
                f"latent head expects taste vectors z of shape [{features.shape[0]}, "
                f"{self.taste_dim}] for {features.shape[0]} images, got {tuple(z.shape)}"
            )
        r = self.utility(features, z)
        if self.config.reference_size == 0:
            return r
        r_ref = self.utility(self.reference[None], z[:, None])  # [B, M]
        return torch.sigmoid(r[:, None] - r_ref).mean(-1)

    def set_reference(self, features: torch.Tensor) -> None:
        """Make `score` the bounded win rate against these reference images [M, D] (M >= 1)."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim or len(features) < 1:
            raise UserError(
                f"reference set must be [M >= 1, {self.feature_dim}] features, "
                f"got {tuple(features.shape)}"
            )
        self.config = dataclasses.replace(self.config, reference_size=features.shape[0])
        self.reference = features.detach().to(self.score_scale.device).float().clone()

    def predict_rating(self, features: torch.Tensor, rater: torch.Tensor) -> torch.Tensor:
        raise UserError(
            "the latent head has no per-rater table for fit_head; train it with "
            "reward_models.research.latent_fit.fit_latent and score with z = head.infer(context).mean"
        )

    # ---- encoder ---------------------------------------------------------------------------
    def encode(self, batch: ContextBatch) -> TastePosterior:
        """Posterior over z for each of U users' padded contexts -> mean, var [U, d]."""
        votes, masks = [], []
        if batch.score_x is not None:
            s, mask = batch.score_s.float(), batch.score_mask
            centred = (s - _masked_mean(s, mask)) / self.score_scale  # rater offset removed
            s = centred[..., None]
            h = self.score_encoder(torch.cat([batch.score_x, s, s * batch.score_x], dim=-1))
            votes.append(self.to_vote(h))
            masks.append(mask)
        if batch.pair_a is not None:
            sign = (1.0 - 2.0 * batch.pair_y.float())[..., None]  # +1: a preferred
            # both orders, averaged, so swapping a and b (and the label) changes nothing
            a, b = batch.pair_a, batch.pair_b
            h = self.pair_encoder(torch.cat([a, b, sign, sign * (a - b)], dim=-1))
            h = h + self.pair_encoder(torch.cat([b, a, -sign, sign * (a - b)], dim=-1))
            votes.append(self.to_vote(0.5 * h))
            masks.append(batch.pair_mask)
        if not votes:
            raise UserError("a context needs scores or pairs; got neither")
        vote = torch.cat(votes, dim=1)  # [U, N + M, 2d]
        mask = torch.cat(masks, dim=1).to(vote.dtype)[..., None]  # [U, N + M, 1]
        m, raw_precision = vote.chunk(2, dim=-1)
        lam = F.softplus(raw_precision) * mask
        precision = 1.0 + lam.sum(1)  # prior N(0, I) has precision 1
        mean = (lam * m).sum(1) / precision
        return TastePosterior(mean, 1.0 / precision)

    def nll(self, batch: ContextBatch, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative log-likelihood of U users' examples under tastes z [S, U, d].

        Returns the mean NLL per comparison (score pairs and choices, each kind averaged, then
        summed), averaged over the S draws, [U]; and the number of examples per user, [U].
        """
        z = z[:, :, None]  # [S, U, 1, d]: one taste per user, broadcast over its examples
        terms, n_items = [], torch.zeros(z.shape[1], device=z.device)
        if batch.score_x is not None:
            r = self.utility(batch.score_x[None], z)  # [S, U, N]
            nll, count = self._score_nll(r, batch.score_s.float(), batch.score_mask)
            terms.append(nll / count.clamp(min=1))
            n_items = n_items + batch.score_mask.sum(-1)
        if batch.pair_a is not None:
            logits = self.utility(batch.pair_a[None], z) - self.utility(batch.pair_b[None], z)
            p_a = (1.0 - batch.pair_y).expand_as(logits)
            bce = F.binary_cross_entropy_with_logits(logits, p_a, reduction="none")
            m = batch.pair_mask.to(bce.dtype)
            terms.append((bce * m).sum(-1).mean(0) / m.sum(-1).clamp(min=1))
            n_items = n_items + batch.pair_mask.sum(-1)
        return sum(terms), n_items

    def _score_nll(self, r, s, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL per user [U] (mean over draws) and its term count [U]; r [S, U, N]."""
        if self.config.likelihood == "bradley_terry":
            # every ordered pair (i, j) the user scored i > j: -log sigmoid(r_i - r_j)
            above = (s[:, :, None] > s[:, None, :]) & mask[:, :, None] & mask[:, None, :]
            nll = F.softplus(-(r[..., :, None] - r[..., None, :])) * above  # [S, U, N, N]
            return nll.sum((-1, -2)).mean(0), above.sum((-1, -2)).to(r.dtype)
        m = mask.to(r.dtype)
        r_c = r - _masked_mean(r, mask)
        t_c = (s - _masked_mean(s, mask)) / self.score_scale
        var = (2 * self.log_noise).exp()
        nll = 0.5 * ((r_c - t_c) ** 2 / var + 2 * self.log_noise + math.log(2 * math.pi)) * m
        return nll.sum(-1).mean(0), m.sum(-1)

    def infer(self, context: Context, refine_steps: int = 0, n_samples: int = 16) -> TastePosterior:
        """Posterior over the taste of one user from their examples; mean, var [1, d].

        Works for users never seen in training; an empty context gives the prior N(0, I).
        `refine_steps` > 0 continues from the encoder's posterior with Adam on the ELBO of the
        context itself (the objective's scale as in training: mean NLL per comparison times the
        number of examples, plus the KL), which corrects the encoder on unusual contexts.
        """
        batch = self.context_batch([context])
        with torch.no_grad():
            post = self.encode(batch)
        if refine_steps <= 0 or len(context) < 2:
            return post
        mean = post.mean.clone().requires_grad_(True)
        log_var = post.var.log().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([mean, log_var], lr=0.05)
        g = torch.Generator().manual_seed(0)  # the same context always gives the same posterior
        was_training = self.training
        self.eval()
        for _ in range(refine_steps):
            with torch.enable_grad():  # callers often score under no_grad
                q = TastePosterior(mean, log_var.exp())
                nll, n_items = self.nll(batch, q.sample(n_samples, g))
                loss = (nll * n_items + q.kl()).sum()
                # only the posterior is stepped; no gradient reaches the head's weights
                mean.grad, log_var.grad = torch.autograd.grad(loss, [mean, log_var])
            optimizer.step()
        self.train(was_training)
        return TastePosterior(mean.detach(), log_var.detach().exp())

    def context_batch(self, contexts: list[Context]) -> ContextBatch:
        """Pad U users' contexts into one batch (checked; on the head's device)."""
        device = self.score_scale.device
        has_scores = any(c.scores is not None and c.scores.numel() for c in contexts)
        has_pairs = any(c.winner is not None and c.winner.numel() for c in contexts)
        batch = ContextBatch()
        if has_scores or not has_pairs:  # an empty context still needs one (masked) slot
            xs = [self._checked(c.features, c.scores, "features/scores") for c in contexts]
            batch.score_x, batch.score_mask = _pad([x for x, _ in xs], self.feature_dim, device)
            batch.score_s, _ = _pad([s[:, None] for _, s in xs], 1, device)
            batch.score_s = batch.score_s[..., 0]
        if has_pairs:
            a = [self._checked(c.features_a, c.winner, "features_a/winner") for c in contexts]
            b = [self._checked(c.features_b, c.winner, "features_b/winner") for c in contexts]
            batch.pair_a, batch.pair_mask = _pad([x for x, _ in a], self.feature_dim, device)
            batch.pair_b, _ = _pad([x for x, _ in b], self.feature_dim, device)
            batch.pair_y, _ = _pad([y[:, None] for _, y in a], 1, device)
            batch.pair_y = batch.pair_y[..., 0]
        return batch

    def _checked(self, x, y, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        if x is None or y is None:
            return torch.zeros(0, self.feature_dim), torch.zeros(0)
        x, y = torch.as_tensor(x).float(), torch.as_tensor(y).float().reshape(-1)
        if x.ndim != 2 or x.shape != (y.numel(), self.feature_dim):
            raise UserError(
                f"context {what}: expected [{y.numel()}, {self.feature_dim}] features for "
                f"{y.numel()} labels, got {tuple(x.shape)}"
            )
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise UserError(f"context {what} contain NaN or inf; drop those examples")
        return x, y


def _pad(rows: list[torch.Tensor], dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [n_u, dim] tensors into [U, max(n_u, 1), dim] zeros-padded, with a bool mask."""
    n = max(1, *(r.shape[0] for r in rows))
    out = torch.zeros(len(rows), n, dim)
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for u, r in enumerate(rows):
        out[u, : r.shape[0]] = r
        mask[u, : r.shape[0]] = True
    return out.to(device), mask.to(device)
