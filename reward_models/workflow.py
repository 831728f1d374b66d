"""From a ratings table to trained heads and their evaluation: what `reward-models train/eval` run.

    data (tables) -> split by image -> CLIP features (cached) -> mean head + rater head -> clusters

A run directory holds everything needed to score and to evaluate again:

    run/mean/  run/rater/        heads (head_config.json + head.safetensors)
    run/clusters/                taste clusters over the rater head's tastes
    run/ensemble/rater-{i}/      optional extra rater heads (bootstrap + seed), for the trainer's
                                 reward-uncertainty penalty
    run/latent/                  optional latent-taste head (encoder + decoder) and
                                 posteriors.safetensors: each training rater's posterior (mean,
                                 var [R, d]) from all their training examples
    run/raters.json              rater id -> row of the rater head's taste table
    run/split.json               held-out images
    run/config.json              the resolved config
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from reward_models.clusters import ClusterConfig, TasteClusters, fit_clusters
from reward_models.config import from_dict, to_dict
from reward_models.data import RatingData, load_ratings, split_by_image
from reward_models.errors import UserError
from reward_models.features import FeatureCache, load_clip
from reward_models.heads import (
    MeanHeadConfig,
    RaterHeadConfig,
    RewardHead,
    build_head,
    load_head,
    save_head,
)
from reward_models.io import load_tensors, read_json, save_tensors, write_json
from reward_models.metrics import adjusted_rand_index, by_rater, pairwise_accuracy, spearman
from reward_models.research.latent import LatentHead, LatentHeadConfig, TastePosterior
from reward_models.research.latent_fit import (
    LatentTrainConfig,
    fit_latent,
    group_by_user,
    user_examples,
)
from reward_models.train import PairSet, ScoreSet, TrainHeadConfig, fit_head

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    path: str = ""  # a ratings file or folder in any layout `load_ratings` reads
    format: str = "auto"
    image_root: str | None = None
    score_range: list[float] | None = None
    on_error: Literal["raise", "skip"] = "raise"
    check_images: Literal["exists", "decode", "none"] = "exists"
    rater_info: str | None = None  # per-rater table (rater_id + metadata) for our own tables


@dataclass
class ClipConfig:
    model: str = ""  # open_clip name ("ViT-L-14"), "local-dir:PATH" or "hf-hub:ORG/NAME"
    pretrained: str | None = None  # tag ("openai") or checkpoint file, for a named model
    batch_size: int = 128
    cache_dir: str | None = None  # default: <out_dir>/../features
    device: str = "cpu"


@dataclass
class SplitConfig:
    test_images: float = 0.2  # fraction of images held out of training, for evaluation
    seed: int = 0


@dataclass
class LatentOptions:
    """The latent-taste head (VPL-style encoder + decoder), trained beside the rater head when
    enabled: its tastes are posteriors a new user's few ratings give without retraining."""

    enabled: bool = False
    head: LatentHeadConfig = field(default_factory=LatentHeadConfig)
    train: LatentTrainConfig = field(default_factory=LatentTrainConfig)


@dataclass
class RewardTrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    mean_head: MeanHeadConfig = field(default_factory=MeanHeadConfig)
    rater_head: RaterHeadConfig = field(default_factory=RaterHeadConfig)
    train: TrainHeadConfig = field(default_factory=TrainHeadConfig)
    clusters: ClusterConfig = field(default_factory=ClusterConfig)
    # extra rater heads, each fitted on a bootstrap resample of the training ratings with its own
    # seed; their disagreement is the reward-uncertainty penalty of the trainer (0: none)
    ensemble_size: int = 0
    latent: LatentOptions = field(default_factory=LatentOptions)
    # a rater-metadata column holding known groups (the toy world's gold "cluster"): evaluation
    # reports every figure per group too, and the agreement of discovered clusters with it
    group_column: str | None = None
    out_dir: str = "runs/reward_models"


@dataclass
class Features:
    """CLIP features of every image a data set names: `matrix[row_of[image]]`."""

    matrix: torch.Tensor  # [M, D]
    row_of: dict[str, int]

    def rows(self, images) -> torch.Tensor:
        return torch.tensor([self.row_of[i] for i in images], dtype=torch.long)


def load_data(cfg: DataConfig, known_raters=None) -> RatingData:
    if not cfg.path:
        raise UserError("no ratings given: set data.path=FILE_OR_FOLDER")
    kw = {"score_range": tuple(cfg.score_range)} if cfg.score_range else {}
    return load_ratings(
        cfg.path,
        cfg.format,
        cfg.image_root,
        check_images=cfg.check_images,
        on_error=cfg.on_error,
        known_raters=known_raters,
        rater_info=cfg.rater_info,
        **kw,
    )


def features_for(data: RatingData, cfg: ClipConfig, cache_dir: Path) -> Features:
    """Features of every image in `data`, computed once and cached by content hash."""
    if not cfg.model:
        raise UserError("no CLIP model given: set clip.model=NAME or local-dir:PATH")
    encoder = load_clip(cfg.model, cfg.pretrained, device=cfg.device)
    images = sorted({i for t in data.tables() for i in t.images})
    root = data.tables()[0].image_root
    cache = FeatureCache(Path(cfg.cache_dir) if cfg.cache_dir else cache_dir, encoder)
    matrix = cache.features([root / i for i in images], batch_size=cfg.batch_size)
    return Features(matrix, {name: i for i, name in enumerate(images)})


def score_set(data: RatingData, feats: Features, rater_index: dict[str, int]) -> ScoreSet | None:
    if data.scores is None or len(data.scores) == 0:
        return None
    df = data.scores.df
    return ScoreSet(
        features=feats.matrix,
        item=feats.rows(df["image"]),
        rater=torch.tensor([rater_index[r] for r in df["rater_id"]]),
        score=torch.tensor(df["score"].to_numpy(), dtype=torch.float32),
    )


def pair_set(data: RatingData, feats: Features, rater_index: dict[str, int]) -> PairSet | None:
    if data.pairs is None or len(data.pairs) == 0:
        return None
    df = data.pairs.df
    return PairSet(
        features=feats.matrix,
        idx_a=feats.rows(df["image_a"]),
        idx_b=feats.rows(df["image_b"]),
        rater=torch.tensor([rater_index[r] for r in df["rater_id"]]),
        winner=torch.tensor(data.pairs.b_preferred, dtype=torch.float32),  # a tie is 0.5
    )


def rater_groups(data: RatingData, column: str | None) -> dict[str, str] | None:
    """rater_id -> known group from a rater-metadata column, or None."""
    if column is None:
        return None
    for table in data.tables():
        if column in table.df.columns:
            return table.df.groupby("rater_id")[column].first().astype(str).to_dict()
    raise UserError(f"group_column {column!r} is not a column of the ratings or rater_info")


def train(cfg: RewardTrainConfig) -> Path:
    """Fit the mean head, the rater head and taste clusters; write them to `cfg.out_dir`."""
    out = Path(cfg.out_dir)
    if cfg.ensemble_size < 0:
        raise UserError(f"ensemble_size={cfg.ensemble_size}: must be 0 (none) or more")
    data = load_data(cfg.data)
    train_data, test_data = split_by_image(data, cfg.split.test_images, cfg.split.seed)
    feats = features_for(data, cfg.clip, out.parent / "features")
    raters = sorted({r for t in train_data.tables() for r in t.rater_ids})
    rater_index = {r: i for i, r in enumerate(raters)}
    scores = score_set(train_data, feats, rater_index)
    pairs = pair_set(train_data, feats, rater_index)
    dim = feats.matrix.shape[1]

    mean_head = build_head(dataclasses.replace(cfg.mean_head, feature_dim=dim))
    log.info("training the mean head")
    fit_head(mean_head, scores, pairs, cfg.train)
    rater_head = build_head(
        dataclasses.replace(cfg.rater_head, feature_dim=dim, n_raters=len(raters))
    )
    log.info("training the rater head")
    fit_head(rater_head, scores, pairs, cfg.train)
    known = rater_groups(train_data, cfg.group_column)
    name_fn = None
    if known is not None:
        name_fn = _majority_namer([known[r] for r in raters])
    clusters = fit_clusters(rater_head.rater_tastes(), cfg.clusters, name_fn=name_fn)

    save_head(mean_head, out / "mean")
    save_head(rater_head, out / "rater")
    for i in range(cfg.ensemble_size):
        log.info("training ensemble rater head %d/%d", i + 1, cfg.ensemble_size)
        member = build_head(
            dataclasses.replace(cfg.rater_head, feature_dim=dim, n_raters=len(raters))
        )
        seed = cfg.train.seed + 1 + i
        fit_head(
            member, *_bootstrap(scores, pairs, seed), dataclasses.replace(cfg.train, seed=seed)
        )
        save_head(member, out / "ensemble" / f"rater-{i}")
    if cfg.latent.enabled:
        log.info("training the latent taste head")
        latent = build_head(dataclasses.replace(cfg.latent.head, feature_dim=dim))
        fit_latent(latent, scores, pairs, cfg.latent.train)
        save_head(latent, out / "latent")
        post = rater_posteriors(latent, scores, pairs, len(raters))
        save_tensors(out / "latent" / POSTERIORS_NAME, {"mean": post.mean, "var": post.var})
    clusters.save(out / "clusters")
    write_json(out / "raters.json", {"rater_ids": raters})
    test_images = sorted({i for t in test_data.tables() for i in t.images})
    write_json(out / "split.json", {"test_images": test_images})
    write_json(out / "config.json", to_dict(cfg))
    return out


POSTERIORS_NAME = "posteriors.safetensors"


@torch.no_grad()
def rater_posteriors(
    head: LatentHead, scores: ScoreSet | None, pairs: PairSet | None, n_raters: int
) -> TastePosterior:
    """Each rater's taste posterior from all their examples, [R, d] (the prior for none)."""
    users = group_by_user(scores, pairs, min_examples=1)
    mean = torch.zeros(n_raters, head.taste_dim)
    var = torch.ones(n_raters, head.taste_dim)
    for r, s_rows, p_rows in zip(users.ids, users.score_rows, users.pair_rows):
        part = torch.arange(len(s_rows) + len(p_rows))
        post = head.encode(head.context_batch([user_examples(s_rows, p_rows, part, scores, pairs)]))
        mean[r], var[r] = post.mean[0], post.var[0]
    return TastePosterior(mean, var)


def _bootstrap(scores: ScoreSet | None, pairs: PairSet | None, seed: int):
    """The same ratings and pairs resampled with replacement (features are shared)."""
    g = torch.Generator().manual_seed(seed)

    def resample(n: int) -> torch.Tensor:
        return torch.randint(n, (n,), generator=g)

    if scores is not None:
        rows = resample(len(scores.score))
        item = None if scores.item is None else scores.item[rows]
        features = scores.features if scores.item is not None else scores.features[rows]
        scores = ScoreSet(features, scores.rater[rows], scores.score[rows], item)
    if pairs is not None:
        rows = resample(len(pairs.winner))
        pairs = PairSet(
            pairs.features,
            pairs.idx_a[rows],
            pairs.idx_b[rows],
            pairs.rater[rows],
            pairs.winner[rows],
        )
    return scores, pairs


def _majority_namer(groups: list[str]):
    """Name each discovered cluster after the known group most of its raters belong to
    (suffixed when two clusters would share a name)."""
    used: dict[str, int] = {}

    def name(k, centroid, members) -> str:
        votes = [groups[int(i)] for i in members]
        best = max(sorted(set(votes)), key=votes.count) if votes else f"cluster_{k}"
        used[best] = used.get(best, 0) + 1
        return best if used[best] == 1 else f"{best}_{used[best]}"

    return name


@dataclass
class TrainedRun:
    cfg: RewardTrainConfig
    mean: RewardHead
    rater: RewardHead
    clusters: TasteClusters
    rater_ids: list[str]
    ensemble: list[RewardHead] = field(default_factory=list)  # extra rater heads, same raters
    latent: LatentHead | None = None
    posteriors: TastePosterior | None = None  # of each rater under the latent head, [R, d]

    @property
    def rater_index(self) -> dict[str, int]:
        return {r: i for i, r in enumerate(self.rater_ids)}


def load_run(run_dir: str | Path) -> TrainedRun:
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a reward-models run (no config.json); train first")
    cfg = from_dict(RewardTrainConfig, read_json(run_dir / "config.json"))
    mean = load_head(run_dir / "mean")
    rater = load_head(run_dir / "rater", feature_dim=mean.feature_dim)
    clusters = TasteClusters.load(run_dir / "clusters")
    ids = read_json(run_dir / "raters.json")["rater_ids"]
    members = sorted(
        (run_dir / "ensemble").glob("rater-*"), key=lambda p: int(p.name.split("-")[1])
    )
    ensemble = [load_head(p, feature_dim=mean.feature_dim).eval() for p in members]
    latent, posteriors = None, None
    if (run_dir / "latent").is_dir():
        latent = load_head(run_dir / "latent", feature_dim=mean.feature_dim).eval()
        post = load_tensors(run_dir / "latent" / POSTERIORS_NAME)
        posteriors = TastePosterior(post["mean"], post["var"])
    return TrainedRun(cfg, mean.eval(), rater.eval(), clusters, ids, ensemble, latent, posteriors)


def _summarise(pred, target, rater, group_of: dict[int, str]) -> dict:
    """Pairwise accuracy and Spearman of one head per rater, per group and the worst group
    (by accuracy); raters with nothing to rank are left out."""
    accuracy = by_rater(pred, target, rater, group_of, pairwise_accuracy)
    rho = by_rater(pred, target, rater, group_of, spearman)
    per_group = {
        g: {
            "pairwise_accuracy": value,
            "spearman": rho.per_cluster.get(g, math.nan),
            "raters": accuracy.raters_per_cluster[g],
        }
        for g, value in accuracy.per_cluster.items()
    }
    worst = accuracy.worst_cluster
    return {
        "pairwise_accuracy": accuracy.mean,
        "spearman": rho.mean,
        "per_group": per_group,
        "worst_group": {"name": worst, **per_group[worst]},
    }


@torch.no_grad()
def evaluate(run_dir: str | Path) -> dict:
    """Held-out-image metrics of the mean and rater heads side by side, per rater and group."""
    run = load_run(run_dir)
    cfg = run.cfg
    data = load_data(cfg.data)
    _, test = split_by_image(data, cfg.split.test_images, cfg.split.seed)
    if test.scores is None or len(test.scores) == 0:
        raise UserError("evaluation needs held-out scores; the test split has none")
    feats = features_for(data, cfg.clip, Path(run_dir).parent / "features")
    index = run.rater_index
    df = test.scores.df[test.scores.df["rater_id"].isin(index)]
    x = feats.matrix[feats.rows(df["image"])]
    rater = torch.tensor([index[r] for r in df["rater_id"]])
    target = df["score"].to_numpy()
    preds = {
        "mean": run.mean.score(x, None).numpy(),
        "rater": run.rater.score(x, run.rater.taste_of(rater)).numpy(),
    }
    labels = run.clusters.labels.tolist()
    groupings = {
        "discovered_cluster": {r: run.clusters.names[labels[r]] for r in range(len(labels))}
    }
    known = rater_groups(data, cfg.group_column)
    if known is not None:
        groupings["known_group"] = {i: known[r] for r, i in index.items()}
    metrics: dict = {"n_test_scores": int(len(df)), "heads": {}}
    for head, pred in preds.items():
        metrics["heads"][head] = {
            name: _summarise(pred, target, rater.numpy(), group_of)
            for name, group_of in groupings.items()
        }
    if known is not None:
        gold = [known[r] for r in run.rater_ids]
        metrics["cluster_ari_vs_known_groups"] = adjusted_rand_index(labels, gold)
    metrics["clusters"] = {"names": run.clusters.names, "shares": run.clusters.shares.tolist()}
    return metrics
