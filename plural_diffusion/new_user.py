"""A new user's taste from a few ratings asked one at a time: which image to ask about next, what
the ratings so far say (the taste z a policy is conditioned on, the nearest taste clusters and how
sure that is).

    rewards = TasteRewards(run_dir, space=CheckpointInfo.read(ckpt).taste_space)
    taste = infer_taste(rewards, features, scores)         # features [n, D], scores [n]
    taste.z                                                 # [d]: what the policy is asked for
    taste.cluster_probability                               # [K]: P(nearest cluster | ratings)
    i = next_query(rewards, taste, candidates, asked=features)   # index into candidates [M, D]

The taste is inferred the way `plural-diffusion generate --ratings` does it, so a ratings file
saved from these answers gives the same z there: a MAP fit under the frozen rater head for a
policy on rater tastes (`reward_models.personalize`), the latent head's encoder posterior for one
on latent tastes. The next image is the candidate with the most information about z, by BALD
over posterior draws (`reward_models.research.latent_query`); under the rater head the posterior
is the Laplace approximation at the MAP taste (the taste prior before two ratings exist).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reward_models.personalize import MIN_RATINGS, TastePrior, fit_taste
from reward_models.research.latent import Context, TastePosterior
from reward_models.research.latent_query import select_queries


class RaterQueryHead:
    """The rater head seen as `select_queries` sees a latent head: `utility(features, z)` with
    broadcasting over leading dimensions, and `feature_dim`."""

    def __init__(self, head):
        self.head = head

    @property
    def feature_dim(self) -> int:
        return self.head.feature_dim

    def utility(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """features [..., D], z [..., d] (broadcast against each other) -> [...]."""
        shape = torch.broadcast_shapes(features.shape[:-1], z.shape[:-1])
        x = features.expand(*shape, features.shape[-1]).reshape(-1, features.shape[-1])
        t = z.expand(*shape, z.shape[-1]).reshape(-1, z.shape[-1]).to(x.device)
        return self.head.score(x, t).view(shape)


@dataclass
class InferredTaste:
    """What a few ratings say about one user's taste."""

    z: torch.Tensor  # [d] the taste the policy is asked for
    posterior: TastePosterior  # mean, var [1, d]: how far z may be off
    cluster_probability: torch.Tensor  # [K] share of posterior draws nearest each cluster's taste
    n_ratings: int

    def nearest_clusters(self, names: list[str]) -> list[tuple[str, float]]:
        """(cluster name, probability), most probable first."""
        order = self.cluster_probability.argsort(descending=True).tolist()
        return [(names[k], float(self.cluster_probability[k])) for k in order]


def query_head(rewards):
    """The head `select_queries` ranks candidates with, for the rewards' taste space."""
    return rewards.taste_head if rewards.space == "latent" else RaterQueryHead(rewards.rater_head)


@torch.no_grad()
def cluster_probability(
    posterior: TastePosterior, centroids: torch.Tensor, n_samples: int = 512, seed: int = 0
) -> torch.Tensor:
    """[K] share of `n_samples` draws from the posterior [1, d] whose nearest centroid [K, d]
    (Euclidean) is each cluster's."""
    g = torch.Generator().manual_seed(seed)
    draws = posterior.sample(n_samples, g)[:, 0].to(centroids.device)  # [S, d]
    nearest = torch.cdist(draws, centroids).argmin(dim=1)  # [S]
    counts = torch.bincount(nearest, minlength=centroids.shape[0]).float()
    return (counts / n_samples).cpu()


def _prior(rewards) -> TastePosterior:
    """The taste posterior before any rating: the rater head's prior over known raters' tastes
    (diagonal of its shrunk covariance), or the latent head's N(0, I)."""
    if rewards.space == "latent":
        return rewards.taste_head.infer(Context())
    prior = TastePrior.from_head(rewards.rater_head)
    var = torch.linalg.inv(prior.precision.double()).diagonal().float()
    return TastePosterior(prior.mean[None], var[None])


def infer_taste(rewards, features: torch.Tensor, scores: torch.Tensor, seed: int = 0):
    """The taste of one user from their scores [n] of images with CLIP features [n, D] (the
    rewards' CLIP model), as `generate --ratings` infers it; `InferredTaste`.

    With fewer than two ratings under the rater head the taste is the prior's mean."""
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    n = int(scores.shape[0])
    device = rewards.cluster_tastes.device
    if rewards.space == "latent":
        ctx = Context(features.float().to(device), scores.to(device)) if n else Context()
        with torch.no_grad():
            post = rewards.taste_head.infer(ctx)
        post = TastePosterior(post.mean.detach(), post.var.detach())
    elif n < MIN_RATINGS:
        post = _prior(rewards)
    else:
        fit = fit_taste(
            rewards.rater_head,
            features.float().to(device),
            scores.to(device),
            starts=rewards.cluster_tastes,
        )
        prior_var = _prior(rewards).var[0].to(device)
        # a flat direction of the posterior (singular Hessian) is as unsure as the prior
        var = torch.where(torch.isfinite(fit.z_sd), fit.z_sd.to(device) ** 2, prior_var)
        post = TastePosterior(fit.z.detach()[None], var.detach()[None])
    probability = cluster_probability(post, rewards.cluster_tastes, seed=seed)
    return InferredTaste(post.mean[0].cpu(), post, probability, n)


def next_query(
    rewards,
    taste: InferredTaste,
    candidates: torch.Tensor,
    asked: torch.Tensor | None = None,
    seed: int = 0,
) -> int:
    """Index into `candidates` [M, D] of the image whose rating says most about the user's taste,
    given the posterior so far and the features [n, D] of the images already rated."""
    device = rewards.cluster_tastes.device
    post = TastePosterior(taste.posterior.mean.to(device), taste.posterior.var.to(device))
    reference = asked.to(device) if asked is not None and len(asked) else None
    pick = select_queries(
        query_head(rewards), post, candidates.to(device), n=1, seed=seed, reference=reference
    )
    return int(pick[0])
