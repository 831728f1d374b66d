"""Rewards routed by taste: images -> CLIP features -> the head for the taste each image was for.

This is the one place the trainer meets `reward_models`: a reward run (mean head, rater head,
taste clusters, trained by `reward-models train`) and the CLIP model its features came from.

    matched  r(x, z) with the rater head, z the taste the image was generated for
    mean     the mean head r(x): the baseline
    maxmin   the rater head at the centroid of the cluster whose batch-mean reward is lowest
             (the egalitarian objective: raise the worst-off group)
"""

from __future__ import annotations

from typing import Literal

import torch

from reward_models.errors import UserError
from reward_models.features import load_clip
from reward_models.workflow import load_run

Objective = Literal["matched", "mean", "maxmin"]


class TasteRewards:
    def __init__(self, run_dir: str, device: str | torch.device = "cpu"):
        self.run = load_run(run_dir)
        clip = self.run.cfg.clip
        self.encoder = load_clip(clip.model, clip.pretrained, device=str(device))
        self.encoder.model.requires_grad_(False)
        if self.encoder.dim != self.run.mean.feature_dim:
            raise UserError(
                f"reward heads in {run_dir} expect {self.run.mean.feature_dim}-dim features but "
                f"CLIP model {clip.model} gives {self.encoder.dim}; use the CLIP model they were "
                "trained on"
            )
        self.mean_head = self.run.mean.to(device).requires_grad_(False)
        self.rater_head = self.run.rater.to(device).requires_grad_(False)
        self.cluster_tastes = self.run.clusters.centroids.float().to(device)  # [K, d]
        self.cluster_names = list(self.run.clusters.names)
        self.cluster_shares = self.run.clusters.shares.float()
        self.rater_tastes = self.rater_head.rater_tastes().float().to(device)  # [R, d]
        self.rater_ids = list(self.run.rater_ids)

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
        return self.rater_head.score(x, z).view(batch, k)

    def reward(
        self, images: torch.Tensor, taste: torch.Tensor | None, objective: Objective
    ) -> torch.Tensor:
        """Reward [B] of each image under `objective`; `taste` [B, d] is required for matched."""
        features = self.features(images)
        if objective == "mean":
            return self.mean_head.score(features, None)
        if objective == "matched":
            if taste is None:
                raise UserError("objective=matched needs a taste per image")
            return self.rater_head.score(features, taste)
        if objective == "maxmin":
            scores = self.cluster_scores(features)  # [B, K]
            worst = scores.detach().mean(dim=0).argmin()
            return scores[:, worst]
        raise UserError(f"unknown objective {objective!r}; use matched, mean or maxmin")
