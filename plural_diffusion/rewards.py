"""Rewards routed by taste: images -> CLIP features -> the head for the taste each image was for.

This is the one place the trainer meets `reward_models`: a reward run (mean head, rater head,
taste clusters, trained by `reward-models train`) and the CLIP model its features came from.

    matched  r(x, z) with the rater head, z the taste the image was generated for
    mean     the mean head r(x): the baseline
    maxmin   the egalitarian objective (raise the worst-off group) for a taste-blind policy:
             each cluster's utility is standardised on the base model's own images
             (`calibrate`), and each batch's images are shared out between the clusters, each
             image to the clusters it is relatively best for, in shares tilted toward the
             clusters served worst so far (`NeedAssignment`): the policy becomes a mixture of
             looks, one per cluster

With `penalty` k > 0 each reward becomes r - k * std, the std taken over an ensemble of rater
heads (the run's own plus its `ensemble/` members, each fitted on a bootstrap of the ratings)
scoring the same image for the same taste: where the heads disagree the reward is least
trustworthy, and that is where a policy over-optimises first.

With `mean_blend` w > 0 the matched reward of a taste from cluster k becomes
(1 - w s_k) r(x, z) + w s_k mean(x), s_k the cluster's share of the raters: the mean head is
fitted to every rating, so it is mostly the majority's taste and sees the top of it more sharply
than the majority's own head does; a minority's reward barely moves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from reward_models.errors import UserError
from reward_models.features import FeatureCache, load_clip
from reward_models.heads import load_head
from reward_models.workflow import load_data, load_run

Objective = Literal["matched", "mean", "maxmin"]
TasteSource = Literal["clusters", "raters"]
TasteSpace = Literal["rater", "latent"]


class TasteRewards:
    """Reward heads of one run, with tastes in one space:

    space="rater"   tastes are the rater head's learned rater vectors (and cluster centroids);
    space="latent"  tastes are the latent head's posteriors (encoder outputs), so a new user's
                    few ratings give a taste the policy was trained on; clusters are the same
                    raters' clusters, their taste the mean of the members' posterior means.
    """

    def __init__(
        self,
        run_dir: str,
        device: str | torch.device = "cpu",
        space: TasteSpace = "rater",
        mean_head: str | None = None,
    ):
        """mean_head: a head directory (e.g. a social head from `reward-models social`) to score
        the taste-blind `mean` objective with, in place of the run's own mean head."""
        self.run = load_run(run_dir)
        self.run_dir = Path(run_dir)
        self.space = space
        self.device = torch.device(device)
        clip = self.run.cfg.clip
        self.encoder = load_clip(clip.model, clip.pretrained, device=str(device))
        self.encoder.model.requires_grad_(False)
        if self.encoder.dim != self.run.mean.feature_dim:
            raise UserError(
                f"reward heads in {run_dir} expect {self.run.mean.feature_dim}-dim features but "
                f"CLIP model {clip.model} gives {self.encoder.dim}; use the CLIP model they were "
                "trained on"
            )
        mean = self.run.mean if not mean_head else load_head(mean_head, self.encoder.dim)
        self.mean_head = mean.eval().to(device).requires_grad_(False)
        self.rater_head = self.run.rater.to(device).requires_grad_(False)
        self.cluster_names = list(self.run.clusters.names)
        self.cluster_shares = self.run.clusters.shares.float()
        self.rater_ids = list(self.run.rater_ids)
        labels = self.run.clusters.labels
        if space == "latent":
            if self.run.latent is None:
                raise UserError(
                    f"{run_dir} has no latent taste head; retrain it with latent.enabled=true"
                )
            self.taste_head = self.run.latent.to(device).requires_grad_(False)
            self.rater_tastes = self.run.posteriors.mean.float().to(device)  # [R, d]
            self.rater_taste_var = self.run.posteriors.var.float().to(device)  # [R, d]
        elif space == "rater":
            self.taste_head = self.rater_head
            self.rater_tastes = self.rater_head.rater_tastes().float().to(device)  # [R, d]
        else:
            raise UserError(f"unknown taste space {space!r}; use rater or latent")
        self.cluster_tastes = self.cluster_tastes_in(space)  # [K, d]
        self.cluster_loc = self.cluster_scale = None  # [K] each, see `calibrate`
        self.cluster_members = [
            (labels == k).nonzero()[:, 0] for k in range(len(self.cluster_names))
        ]
        # The ensemble members learned their own rater tables, so a taste is carried into a
        # member's space by index: the same rater, or the mean of the same cluster's raters.
        self.members = [h.to(device).requires_grad_(False) for h in self.run.ensemble]
        self._member_tastes = {"clusters": [self.cluster_tastes], "raters": [self.rater_tastes]}
        for head in self.members:
            tastes = head.rater_tastes().float().to(device)  # [R, d]
            self._member_tastes["raters"].append(tastes)
            self._member_tastes["clusters"].append(
                _cluster_means(tastes, labels, len(self.cluster_names))
            )

    def cluster_tastes_in(self, space: TasteSpace) -> torch.Tensor:
        """The clusters' tastes [K, d] in `space`, whichever space this object scores in (a
        policy trained on latent tastes is asked for clusters by their latent taste): the
        rater head's cluster centroids, or the mean of each cluster's posterior means."""
        if space == "rater":
            return self.run.clusters.centroids.float().to(self.device)
        if self.run.posteriors is None:
            raise UserError("a latent-taste policy needs a reward run with latent.enabled=true")
        labels, k = self.run.clusters.labels, len(self.cluster_names)
        return _cluster_means(self.run.posteriors.mean.float(), labels, k).to(self.device)

    @property
    def taste_dim(self) -> int:
        return self.cluster_tastes.shape[1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> L2-normalised CLIP features [B, D]; differentiable."""
        pixels = self.encoder.pixels_from_tensors(images)
        return self.encoder.model.encode_image(pixels, normalize=True).float()

    def cluster_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Utility of each image for each cluster centroid, [B, K]."""
        batch, k = features.shape[0], self.cluster_tastes.shape[0]
        z = self.cluster_tastes.repeat(batch, 1)  # [B * K, d]: image-major
        x = features.repeat_interleave(k, dim=0)
        return self.taste_head.score(x, z).view(batch, k)

    @torch.no_grad()
    def rated_cluster_spread(self) -> torch.Tensor:
        """[K] the std of each cluster's utility over the images the reward run's raters rated
        (its data.path; features from the run's feature cache): each head's own scale."""
        cfg = self.run.cfg
        data = load_data(cfg.data)
        root = data.tables()[0].image_root
        images = sorted({root / i for t in data.tables() for i in t.images})
        cache_dir = cfg.clip.cache_dir or self.run_dir.parent / "features"  # as training's
        feats = FeatureCache(cache_dir, self.encoder).features(images, cfg.clip.batch_size)
        scores = torch.cat([self.cluster_scores(f) for f in feats.to(self.device).split(1024)])
        return scores.float().std(dim=0)

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor) -> None:
        """Put the clusters' utilities on one scale: the mean and std of each cluster's head
        over `images` [N, 3, H, W] (the base model's own samples)."""
        scores = self.cluster_scores(self.features(images)).float()  # [N, K]
        self.cluster_loc = scores.mean(dim=0)
        self.cluster_scale = scores.std(dim=0).clamp(min=1e-6)

    def standardized_cluster_scores(self, features: torch.Tensor) -> torch.Tensor:
        """[B, K] cluster utilities in standard deviations from the calibration images' mean."""
        if self.cluster_loc is None:
            raise UserError("standardised cluster scores need calibrate(images) first")
        return (self.cluster_scores(features) - self.cluster_loc) / self.cluster_scale

    def reward(
        self,
        images: torch.Tensor,
        taste: torch.Tensor | None,
        objective: Objective,
        penalty: float = 0.0,
        taste_index: torch.Tensor | None = None,
        source: TasteSource = "clusters",
        assign: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mean_blend: float = 0.0,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reward [B] of each image under `objective`.

        assign: maxmin's standardised cluster scores [B, K] (detached) -> each image's weight on
            each cluster [B, K], e.g. `NeedAssignment.assign`.

        taste: [B, d], required for matched. penalty > 0 subtracts `penalty` times the
        ensemble's std, which needs `taste_index` [B] (rows of the `source` taste table) for
        matched, as the members read tastes by index. mean_blend > 0 (matched) shrinks each
        reward toward the mean head by mean_blend times its cluster's share; it too needs
        `taste_index`. features: the images' `features`, when the caller already has them.
        """
        if features is None:
            features = self.features(images)
        if objective == "mean":
            reward, index = self.mean_head.score(features, None), None
        elif objective == "matched":
            if taste is None:
                raise UserError("objective=matched needs a taste per image")
            reward, index = self.taste_head.score(features, taste), taste_index
            if mean_blend > 0:
                if taste_index is None:
                    raise UserError("mean_blend needs the taste index of each image")
                w = mean_blend * self.taste_shares(taste_index, source).to(reward)
                reward = (1 - w) * reward + w * self.mean_head.score(features, None)
        elif objective == "maxmin":
            if assign is None:
                raise UserError("objective=maxmin needs each image's cluster assignment")
            scores = self.standardized_cluster_scores(features)  # [B, K]
            assignment = assign(scores.detach())
            reward = (scores * assignment.to(scores)).sum(dim=1)
            # the ensemble penalty reads the taste of the cluster each image serves most
            index, source = assignment.argmax(dim=1), "clusters"
        else:
            raise UserError(f"unknown objective {objective!r}; use matched, mean or maxmin")
        if penalty > 0:
            if objective == "matched" and taste_index is None:
                raise UserError("the ensemble penalty needs the taste index of each image")
            reward = reward - penalty * self.ensemble_std(features, index, source)
        return reward

    def taste_shares(self, taste_index: torch.Tensor, source: TasteSource) -> torch.Tensor:
        """The share of the raters in the cluster of each taste, [B] (`taste_index` rows of
        the `source` table: clusters, or raters, each in its own cluster)."""
        shares = self.cluster_shares.to(taste_index.device)
        if source == "raters":
            return shares[self.run.clusters.labels.to(taste_index.device)[taste_index]]
        return shares[taste_index]

    def ensemble_std(
        self, features: torch.Tensor, taste_index: torch.Tensor | None, source: TasteSource
    ) -> torch.Tensor:
        """Std [B] over the rater-head ensemble of each image's utility for its taste
        (`taste_index` [B] into the `source` table; None = the null taste, no preference)."""
        return self.ensemble_utilities(features, taste_index, source).std(dim=0)

    def ensemble_utilities(
        self, features: torch.Tensor, taste_index: torch.Tensor | None, source: TasteSource
    ) -> torch.Tensor:
        """[M, B] each image's utility for its taste under each head of the rater-head ensemble:
        row 0 the run's own head, then its bootstrapped members, each reading the taste in its
        own space (the same rater, or the mean of the same cluster's raters)."""
        if self.space != "rater":
            raise UserError("the ensemble penalty works in the rater head's taste space only")
        if not self.members:
            raise UserError(
                "ensemble_penalty needs a reward run with ensemble heads: retrain it with "
                "ensemble_size=N (e.g. 4)"
            )
        heads = [self.rater_head, *self.members]
        utilities = []
        for head, tastes in zip(heads, self._member_tastes[source]):
            z = None if taste_index is None else tastes[taste_index.to(tastes.device)]
            utilities.append(head.score(features, z))
        return torch.stack(utilities)


def _cluster_means(tastes: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Mean taste of each cluster's raters: tastes [R, d], labels [R] -> [K, d]."""
    return torch.stack([tastes[labels.to(tastes.device) == i].mean(dim=0) for i in range(k)])


class NeedAssignment:
    """Which clusters each image of a taste-blind policy is rewarded for (maxmin).

    A taste-blind policy cannot serve every cluster with one look when their ideals conflict;
    its egalitarian optimum is a mixture, a share of its images for each cluster. Measured
    alternatives that failed on some bases: rewarding every image by a softmin-weighted sum of
    the clusters' utilities, or by the cluster that is worst-off in the batch, moves all images
    the same way, and the policy ends in the one cluster whose ideal is nearest (worst cluster
    below the base model's). Here each batch's images are split between the clusters, each
    image to the clusters it is relatively best for, in shares tilted toward the clusters
    served worst so far: a balanced (Sinkhorn) assignment of the standardised scores s [B, K],

        a = argmax_a sum_ik a_ik s_ik / temperature + entropy(a)
            rows sum to 1, column k to B * softmax(-m)_k

    with m [K] running estimates (over many batches, not re-picked per batch) of each cluster's
    mean standardised reward, and image i is rewarded sum_k a_ik s_ik. The noise that starts an
    image decides which look it grows into; the worst-off cluster has the largest share of
    images climbing toward it, so a taste-blind LoRA pulled one way by the others still moves
    for it. The assignment carries no gradient.
    """

    def __init__(self, n_clusters: int, temperature: float = 0.5, momentum: float = 0.9):
        if n_clusters < 2:
            raise UserError(
                f"objective=maxmin with {n_clusters} taste cluster: there is no worst-off group "
                "to raise; use objective=mean, or a reward run with clusters.n_clusters >= 2"
            )
        if temperature <= 0 or not 0 <= momentum < 1:
            raise UserError(
                f"maxmin.temperature={temperature} must be > 0 and maxmin.momentum={momentum} "
                "in [0, 1)"
            )
        self.temperature, self.momentum = temperature, momentum
        self.estimate = torch.zeros(n_clusters)  # the base model's images average 0

    def observe(self, batch_mean: torch.Tensor) -> None:
        """Fold in one batch's mean standardised reward per cluster, [K]."""
        m = self.momentum
        self.estimate = m * self.estimate + (1 - m) * batch_mean.detach().float().cpu()

    @torch.no_grad()
    def shares(self) -> torch.Tensor:
        """Each cluster's share of a batch's images, [K]: a softmin of the running estimates
        (in standard deviations of the base model's scores), equal at the start."""
        return torch.softmax(-self.estimate, dim=0)

    def assign(self, scores: torch.Tensor, iterations: int = 100) -> torch.Tensor:
        """Standardised scores [B, K] -> each image's weights on the clusters [B, K] (rows sum
        to 1, cluster k's column to B * shares()[k])."""
        log_p = scores.detach().double() / self.temperature  # Sinkhorn in log space
        batch = log_p.shape[0]
        log_col = (batch * self.shares()).log().to(log_p)
        for _ in range(iterations):
            log_p = log_p - log_p.logsumexp(dim=1, keepdim=True)  # each image's weights sum to 1
            log_p = log_p - log_p.logsumexp(dim=0) + log_col  # each cluster gets its share
        log_p = log_p - log_p.logsumexp(dim=1, keepdim=True)
        return log_p.exp().to(scores.dtype)

    def state_dict(self) -> dict:
        return {"estimate": self.estimate.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.estimate = torch.tensor(state["estimate"], dtype=torch.float32)
