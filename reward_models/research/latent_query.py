"""Active querying for the latent taste head: which images to ask a new user about next.

    posterior = head.infer(context, refine_steps=50)
    next_images = select_queries(head, posterior, candidate_features, n=1)          # [1]
    next_pairs = select_queries(head, posterior, candidate_features, kind="pair")   # [1, 2]

Both kinds rank candidates by BALD (Houlsby et al. 2011): the mutual information between the
answer and the user's taste z, H(E_z p) - E_z H(p), estimated with draws from the posterior. It
is large where tastes the posterior still allows disagree, and small where the answer is certain
or where every allowed taste is equally unsure (noise the answer cannot resolve).
"""

from __future__ import annotations

from typing import Literal

import torch

from reward_models.errors import UserError
from reward_models.research.latent import LatentHead, TastePosterior


@torch.no_grad()
def select_queries(
    head: LatentHead,
    posterior: TastePosterior,
    candidates: torch.Tensor,
    n: int = 1,
    kind: Literal["score", "pair"] = "score",
    n_samples: int = 128,
    seed: int = 0,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next images (or pairs) to ask one user about, by information about their taste.

    Draws S tastes from the user's posterior [1, d] and scores the candidates [M, D] by BALD:
    - kind="score": a rating tells the head how the image orders against the user's other
      rated images (the likelihood reads only those comparisons), so the gain of image i is its
      mean BALD over comparisons with `reference` [M', D], the features the user has already
      rated (default: the candidates themselves). Returns image indices [n].
    - kind="pair": the BALD of the choice between a and b, over all M(M-1)/2 candidate pairs.
      Returns index pairs [n, 2].
    The n picks are the top n, not a jointly optimal batch: ask one, re-infer, ask again,
    preferably with a refined posterior (`infer(..., refine_steps=50)`), since the encoder was
    trained on random contexts, not on ones the queries picked.
    """
    if candidates.ndim != 2 or candidates.shape[1] != head.feature_dim:
        raise UserError(
            f"candidates must be [M, {head.feature_dim}] features, got {tuple(candidates.shape)}"
        )
    g = torch.Generator().manual_seed(seed)
    z = posterior.sample(n_samples, g)[:, 0]  # [S, d]
    r = head.utility(candidates[None].to(z.device), z[:, None])  # [S, M]
    if kind == "score":
        ref = candidates if reference is None else reference
        r_ref = head.utility(ref[None].to(z.device), z[:, None])  # [S, M']
        p = torch.sigmoid(r[:, :, None] - r_ref[:, None, :])  # [S, M, M'] P(i beats j | z_s)
        gain = (_entropy(p.mean(0)) - _entropy(p).mean(0)).mean(-1)  # [M]
        return gain.topk(min(n, gain.numel())).indices
    p = torch.sigmoid(r[:, :, None] - r[:, None, :])  # [S, M, M] P(i beats j | z_s)
    bald = _entropy(p.mean(0)) - _entropy(p).mean(0)  # [M, M] mutual information with z
    i, j = torch.triu_indices(r.shape[1], r.shape[1], offset=1)
    top = bald[i, j].topk(min(n, i.numel())).indices
    return torch.stack([i[top], j[top]], dim=1)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Binary entropy in nats, elementwise."""
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(p * p.log() + (1 - p) * (1 - p).log())
