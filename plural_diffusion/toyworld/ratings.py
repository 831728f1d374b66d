"""Rating data of the toy world, written in the same on-disk layout a user's own data would have.

Each gold rater scores a small random subset of the images (incomplete data) on a 0-10 scale with
a personal offset (harsh or generous), scale and noise, and compares random pairs of images
(Bradley-Terry choice on their gold utility). Everything is deterministic from `cfg.seed`.

Layout of `out_dir`:
    images/img_00000.png ...   the procedural images
    images.csv                 image, caption and the attributes that made it
    scores.csv                 image, rater_id, score
    pairs.csv                  image_a, image_b, rater_id, winner ("a" or "b")
    raters.csv                 rater_id, gold cluster, and how the rater reports (offset, scale)
    world.json                 the config, so the gold raters can be rebuilt exactly
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from plural_diffusion.toyworld.images import ToyImageSet, make_images
from plural_diffusion.toyworld.raters import (
    ClusterSpec,
    GoldRaters,
    default_clusters,
    gold_utility,
    make_raters,
)
from reward_models.config import from_dict, to_dict
from reward_models.errors import UserError
from reward_models.io import atomic_dir, atomic_path, read_json, write_json


@dataclass
class ToyWorldConfig:
    seed: int = 0
    image_size: int = 32
    n_images: int = 1200
    n_raters: int = 60
    clusters: list[ClusterSpec] = field(default_factory=default_clusters)
    taste_jitter: float = 0.04  # sd of each rater's ideal point around its cluster's
    scores_per_rater: int = 60
    pairs_per_rater: int = 60
    score_noise: float = 0.8  # sd of the noise on a 0-10 score
    offset_sd: float = 0.8  # sd of a rater's harsh/generous offset, in score points
    scale_sd: float = 0.15  # sd of log of a rater's scale
    pair_temperature: float = 0.05  # Bradley-Terry temperature on gold utility differences
    format: Literal["csv", "parquet"] = "csv"


@dataclass
class ToyWorld:
    """A written toy world: its images, gold raters and where the tables are."""

    root: Path
    config: ToyWorldConfig
    images: ToyImageSet
    raters: GoldRaters
    image_names: list[str]

    def table(self, name: str) -> Path:
        return self.root / f"{name}.{self.config.format}"


def build_world(cfg: ToyWorldConfig) -> tuple[ToyImageSet, GoldRaters]:
    """The images and gold raters of a world (no files written)."""
    images = make_images(cfg.n_images, cfg.image_size, cfg.seed)
    raters = make_raters(cfg.n_raters, cfg.clusters, jitter=cfg.taste_jitter, seed=cfg.seed + 1)
    return images, raters


def _reporting(cfg: ToyWorldConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    offset = cfg.offset_sd * torch.randn(cfg.n_raters, generator=g)
    scale = torch.exp(cfg.scale_sd * torch.randn(cfg.n_raters, generator=g))
    return offset, scale


def simulate_ratings(cfg: ToyWorldConfig, images: ToyImageSet, raters: GoldRaters):
    """Scores and pairs tables (as DataFrames with image indices) plus the reporting params."""
    if cfg.scores_per_rater > cfg.n_images or cfg.pairs_per_rater < 0:
        raise UserError(
            f"scores_per_rater={cfg.scores_per_rater} must be <= n_images={cfg.n_images}"
        )
    g = torch.Generator().manual_seed(cfg.seed + 2)
    utility = gold_utility(images.images, raters)  # [N, R]
    offset, scale = _reporting(cfg, g)
    score_rows, pair_rows = [], []
    for r in range(len(raters)):
        seen = torch.randperm(cfg.n_images, generator=g)[: cfg.scores_per_rater]
        latent = 1.0 + 8.0 * utility[seen, r]  # the rater's 1..9 impression
        noisy = (
            offset[r] + scale[r] * latent + cfg.score_noise * torch.randn(len(seen), generator=g)
        )
        score = noisy.round().clamp(0, 10) + 0.0  # + 0.0 turns -0.0 into 0.0
        score_rows += [(int(i), r, float(s)) for i, s in zip(seen, score)]
        a = torch.randint(cfg.n_images, (cfg.pairs_per_rater,), generator=g)
        b = (a + torch.randint(1, cfg.n_images, (cfg.pairs_per_rater,), generator=g)) % cfg.n_images
        p_a = torch.sigmoid((utility[a, r] - utility[b, r]) / cfg.pair_temperature)
        a_wins = torch.rand(cfg.pairs_per_rater, generator=g) < p_a
        pair_rows += [(int(i), int(j), r, "a" if w else "b") for i, j, w in zip(a, b, a_wins)]
    scores = pd.DataFrame(score_rows, columns=["image", "rater", "score"])
    pairs = pd.DataFrame(pair_rows, columns=["image_a", "image_b", "rater", "winner"])
    return scores, pairs, offset, scale


def _write_table(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)


def write_world(cfg: ToyWorldConfig, out_dir: str | Path, progress: bool = True) -> ToyWorld:
    """Render and rate a toy world into `out_dir` (replaced atomically when complete)."""
    out_dir = Path(out_dir)
    images, raters = build_world(cfg)
    scores, pairs, offset, scale = simulate_ratings(cfg, images, raters)
    names = [f"images/img_{i:05d}.png" for i in range(len(images))]
    ext = cfg.format
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        pixels = (images.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for name, px in tqdm(
            list(zip(names, pixels)), desc="toy images", disable=not progress, leave=False
        ):
            Image.fromarray(px).save(tmp / name)
        attrs = pd.DataFrame([a.as_dict() for a in images.attributes])
        attrs.insert(0, "caption", images.captions)
        attrs.insert(0, "image", names)
        _write_table(attrs, tmp / f"images.{ext}")
        ids = np.array(raters.ids)
        scores = scores.assign(image=[names[i] for i in scores.image], rater_id=ids[scores.rater])
        _write_table(scores[["image", "rater_id", "score"]], tmp / f"scores.{ext}")
        pairs = pairs.assign(
            image_a=[names[i] for i in pairs.image_a],
            image_b=[names[i] for i in pairs.image_b],
            rater_id=ids[pairs.rater],
        )
        _write_table(pairs[["image_a", "image_b", "rater_id", "winner"]], tmp / f"pairs.{ext}")
        cluster_names = np.array(raters.cluster_names)
        rater_table = pd.DataFrame(
            {
                "rater_id": raters.ids,
                "cluster": cluster_names[raters.cluster.numpy()],
                "offset": offset.numpy(),
                "scale": scale.numpy(),
            }
        )
        _write_table(rater_table, tmp / f"raters.{ext}")
        write_json(tmp / "world.json", to_dict(cfg))
    return ToyWorld(out_dir, cfg, images, raters, names)


def load_world(root: str | Path) -> ToyWorld:
    """A world written by `write_world`, its gold raters rebuilt exactly from `world.json`."""
    root = Path(root)
    cfg = from_dict(ToyWorldConfig, read_json(root / "world.json"))
    images, raters = build_world(cfg)
    names = [f"images/img_{i:05d}.png" for i in range(len(images))]
    return ToyWorld(root, cfg, images, raters, names)
