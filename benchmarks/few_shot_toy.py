"""Few-shot taste on the toy world: latent head vs baselines, active querying, EM and MDN groups.

    .venv/bin/python benchmarks/few_shot_toy.py            # full run (see the JSON for timings)
    .venv/bin/python benchmarks/few_shot_toy.py --quick    # a smaller smoke run

Measures, on held-out raters of a toy world whose gold utilities are known:
1. few-shot adaptation from k = 5, 10, 20 ratings (latent head posterior mean) - pairwise accuracy
   and Spearman against each rater's gold utility on held-out images - next to the mean head,
   the latent head at its prior (z = 0), the full-data rater head (trained on all ratings of
   every rater, held-out raters included) and the rater's gold cluster utility (a ceiling);
2. active vs random querying: ratings asked one at a time (simulated with the toy world's own
   reporting model) chosen by posterior information gain or at random; accuracy per count;
3. the FLICKR-AES protocol (`few_shot_protocol`) on the toy tables, through the data adapters;
4. EM mixture of heads over all raters: ARI against the gold clusters (K given, K chosen);
5. MDN head: rater-to-component ARI and per-component Spearman with the cluster utilities.
Writes benchmarks/results/few_shot_toy.json and benchmarks/results/few_shot_toy_active.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment

from plural_diffusion.cache import cached_stage
from plural_diffusion.toyworld.raters import gold_cluster_utility, gold_utility, pixel_stats
from plural_diffusion.toyworld.ratings import ToyWorldConfig, load_world, write_world
from reward_models.config import to_dict
from reward_models.data import RatingData, load_ratings, split_by_rater
from reward_models.heads import MeanHeadConfig, RaterHeadConfig, build_head
from reward_models.metrics import adjusted_rand_index, pairwise_accuracy, spearman
from reward_models.research.latent import Context, LatentHead, LatentHeadConfig
from reward_models.research.latent_eval import (
    FewShotResult,
    diagnose,
    few_shot_eval,
    few_shot_protocol,
)
from reward_models.research.latent_fit import LatentTrainConfig, fit_latent
from reward_models.research.latent_query import select_queries
from reward_models.research.mdn import MDNHeadConfig, MDNTrainConfig, fit_mdn, rater_log_likelihood
from reward_models.research.mixture import EMConfig, fit_em
from reward_models.train import PairSet, ScoreSet, TrainHeadConfig, fit_head

RESULTS = Path(__file__).parent / "results"


@dataclass
class BenchConfig:
    world: ToyWorldConfig = field(default_factory=lambda: ToyWorldConfig(n_raters=120))
    # "toy_clip": the project's tiny open_clip (trained once, cached); "pixel_stats": the four
    # gold statistics through a fixed random tanh layer, a stand-in when no CLIP is at hand
    features: Literal["toy_clip", "pixel_stats"] = "toy_clip"
    test_raters: float = 0.25
    eval_images: int = 300  # gold-utility evaluation images (never used as query candidates)
    query_pool: int = 200  # candidate images for active/random querying
    ks: tuple[int, ...] = (5, 10, 20)
    query_start: int = 2
    query_max: int = 20
    query_seeds: int = 2
    refine_steps: int = 50  # semi-amortised posterior refinement in querying (0: encoder only)
    latent_head: LatentHeadConfig = field(
        default_factory=lambda: LatentHeadConfig(taste_dim=8, hidden_dims=(128, 64))
    )
    latent_train: LatentTrainConfig = field(default_factory=LatentTrainConfig)
    head_train: TrainHeadConfig = field(default_factory=lambda: TrainHeadConfig(progress=False))
    em: EMConfig = field(default_factory=lambda: EMConfig(n_components=None))
    mdn_train: MDNTrainConfig = field(default_factory=MDNTrainConfig)
    seed: int = 0


# ---- the world and its features -----------------------------------------------------------------
def toy_features(cfg: BenchConfig, images: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Features [N, D] of the world's images and a note saying which extractor made them."""
    if cfg.features == "toy_clip":
        from plural_diffusion.toyworld.clip import ToyClipConfig, train_toy_clip
        from reward_models.features import load_clip

        clip_cfg = ToyClipConfig()
        clip_dir = cached_stage(
            "toy-clip", to_dict(clip_cfg), lambda d: train_toy_clip(clip_cfg, d, progress=False)
        )
        encoder = load_clip("local-dir:" + str(clip_dir))
        quantised = (images * 255).round() / 255  # what the PNG files hold
        return encoder.encode_images(quantised, progress=False), f"toy CLIP at {clip_dir}"
    g = torch.Generator().manual_seed(1234)
    w, b = 3.0 * torch.randn(4, 64, generator=g), torch.randn(64, generator=g)
    x = torch.tanh((pixel_stats(images) - 0.5) @ w + b)
    return torch.nn.functional.normalize(x, dim=-1), "pixel_stats -> fixed random tanh(64)"


@dataclass
class Toy:
    world: object  # plural_diffusion ToyWorld
    data: RatingData
    features: torch.Tensor  # [N_images, D]
    feature_note: str
    row_of: dict[str, int]  # image name -> feature row
    rater_index: dict[str, int]  # rater id -> gold rater row
    cluster: np.ndarray  # [R] gold cluster of each rater
    gold: torch.Tensor  # [N_images, R] gold utility
    gold_cluster: torch.Tensor  # [N_images, K]
    reporting: pd.DataFrame  # offset, scale per rater (index rater_id)

    def rows(self, names: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.row_of[n] for n in names], dtype=torch.long)


def build_toy(cfg: BenchConfig) -> Toy:
    root = cached_stage(
        "toy-world", to_dict(cfg.world), lambda d: write_world(cfg.world, d, progress=False)
    )
    world = load_world(root)
    data = load_ratings(root, rater_info=world.table("raters"))
    features, note = toy_features(cfg, world.images.images)
    raters = pd.read_csv(world.table("raters")).set_index("rater_id")
    return Toy(
        world=world,
        data=data,
        features=features,
        feature_note=note,
        row_of={n: i for i, n in enumerate(world.image_names)},
        rater_index={r: i for i, r in enumerate(world.raters.ids)},
        cluster=world.raters.cluster.numpy(),
        gold=gold_utility(world.images.images, world.raters),
        gold_cluster=gold_cluster_utility(world.images.images, world.raters),
        reporting=raters[["offset", "scale"]],
    )


def tensors(toy: Toy, data: RatingData) -> tuple[ScoreSet, PairSet]:
    """ScoreSet / PairSet over `toy.features`, rater index = the gold rater row."""
    s, p = data.scores.df, data.pairs.df
    scores = ScoreSet(
        toy.features,
        torch.tensor([toy.rater_index[r] for r in s["rater_id"]]),
        torch.tensor(s["score"].to_numpy(), dtype=torch.float32),
        toy.rows(s["image"]),
    )
    pairs = PairSet(
        toy.features,
        toy.rows(p["image_a"]),
        toy.rows(p["image_b"]),
        torch.tensor([toy.rater_index[r] for r in p["rater_id"]]),
        torch.tensor((p["winner"] == "b").to_numpy(), dtype=torch.float32),
    )
    return scores, pairs


def simulate_scores(toy: Toy, rater: str, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """New ratings by a gold rater, the way `plural_diffusion.toyworld.ratings` makes them."""
    cfg, r = toy.world.config, toy.rater_index[rater]
    offset, scale = toy.reporting.loc[rater, "offset"], toy.reporting.loc[rater, "scale"]
    latent = 1.0 + 8.0 * toy.gold[images, r]
    noisy = offset + scale * latent + cfg.score_noise * torch.randn(len(images), generator=g)
    return noisy.round().clamp(0, 10)


# ---- 1. few-shot adaptation against gold utility --------------------------------------------------
def train_heads(cfg: BenchConfig, toy: Toy, train: RatingData) -> dict:
    """The latent head and the mean head on the training raters; the rater head on everyone."""
    dim = toy.features.shape[1]
    s_tr, p_tr = tensors(toy, train)
    s_all, p_all = tensors(toy, toy.data)
    seconds = {}
    t0 = time.perf_counter()
    latent = build_head(dataclasses.replace(cfg.latent_head, feature_dim=dim))
    history = fit_latent(latent, s_tr, p_tr, cfg.latent_train)
    seconds["latent"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean = build_head(MeanHeadConfig(feature_dim=dim, hidden_dims=(128, 64)))
    fit_head(mean, s_tr, p_tr, cfg.head_train)
    seconds["mean"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rater = build_head(RaterHeadConfig(feature_dim=dim, n_raters=len(toy.rater_index)))
    fit_head(rater, s_all, p_all, cfg.head_train)
    seconds["rater_full_data"] = time.perf_counter() - t0
    return {"latent": latent, "mean": mean, "rater": rater, "history": history, "seconds": seconds}


def _ranking(pred: torch.Tensor, gold: torch.Tensor) -> tuple[float, float]:
    return pairwise_accuracy(pred, gold), spearman(pred, gold)


@torch.no_grad()
def few_shot_table(cfg: BenchConfig, toy: Toy, heads: dict, test: RatingData, eval_idx) -> dict:
    """Mean (pairwise accuracy, Spearman) over held-out raters x context draws, per method."""
    latent: LatentHead = heads["latent"]
    table = test.scores
    rows: dict[str, list[tuple[float, float]]] = {}
    for rater in table.rater_ids:
        r = toy.rater_index[rater]
        x_eval, gold = toy.features[eval_idx], toy.gold[eval_idx, r]
        fixed = {
            "mean_head": heads["mean"].score(x_eval),
            "latent_prior_z0": latent.score(x_eval),
            "rater_head_full_data": heads["rater"].score(
                x_eval, heads["rater"].taste_of(torch.full((len(eval_idx),), r))
            ),
            "gold_cluster_utility": toy.gold_cluster[eval_idx, toy.cluster[r]],
        }
        for name, pred in fixed.items():
            rows.setdefault(name, []).append(_ranking(pred, gold))
        mine = table.df[table.df["rater_id"] == rater]
        for k in cfg.ks:
            for seed in range(cfg.query_seeds):
                pick = mine.sample(n=k, random_state=seed)
                ctx = Context(
                    toy.features[toy.rows(pick["image"])],
                    torch.tensor(pick["score"].to_numpy(), dtype=torch.float32),
                )
                for suffix, steps in (("", 0), ("_refined", cfg.refine_steps)):
                    z = latent.infer(ctx, refine_steps=steps).mean.expand(len(eval_idx), -1)
                    rows.setdefault(f"latent_k{k}{suffix}", []).append(
                        _ranking(latent.score(x_eval, z), gold)
                    )
    return {
        name: {
            "pairwise_accuracy": float(np.nanmean([a for a, _ in v])),
            "spearman": float(np.nanmean([s for _, s in v])),
            "n": len(v),
        }
        for name, v in rows.items()
    }


# ---- 2. active vs random querying -----------------------------------------------------------------
@torch.no_grad()
def query_curves(cfg: BenchConfig, toy: Toy, latent: LatentHead, raters, eval_idx, pool_idx):
    """Gold pairwise accuracy after n = query_start..query_max ratings, per strategy, [n].

    "active" and "random" infer with `refine_steps` of posterior refinement; "active_encoder_only"
    uses the encoder's posterior alone, for choosing and for scoring.
    """
    counts = list(range(cfg.query_start, cfg.query_max + 1))
    strategies = {
        "active": cfg.refine_steps,
        "random": cfg.refine_steps,
        "active_encoder_only": 0,
    }
    acc: dict[str, list[list[float]]] = {name: [] for name in strategies}
    for rater in raters:
        r = toy.rater_index[rater]
        for seed in range(cfg.query_seeds):
            for strategy, refine_steps in strategies.items():
                g = torch.Generator().manual_seed(1000 * seed + r)
                order = pool_idx[torch.randperm(len(pool_idx), generator=g)]
                asked = order[: cfg.query_start].tolist()
                rated = simulate_scores(toy, rater, torch.tensor(asked), g)  # each asked once
                curve = []
                while True:
                    idx = torch.tensor(asked)
                    post = latent.infer(Context(toy.features[idx], rated), refine_steps)
                    z = post.mean.expand(len(eval_idx), -1)
                    pred = latent.score(toy.features[eval_idx], z)
                    curve.append(pairwise_accuracy(pred, toy.gold[eval_idx, r]))
                    if len(asked) == cfg.query_max:
                        break
                    left = torch.tensor([i for i in order.tolist() if i not in set(asked)])
                    if strategy == "random":
                        nxt = int(left[0])  # `order` is already a random permutation
                    else:
                        ref = toy.features[idx]  # a rating is compared with the user's others
                        pick = select_queries(
                            latent, post, toy.features[left], seed=seed, reference=ref
                        )
                        nxt = int(left[pick[0]])
                    asked.append(nxt)
                    rated = torch.cat([rated, simulate_scores(toy, rater, torch.tensor([nxt]), g)])
                acc[strategy].append(curve)
    return counts, {k: np.array(v) for k, v in acc.items()}  # [n_runs, n_counts]


def ratings_to_reach(counts: list[int], curve: np.ndarray, level: float) -> int | None:
    hit = np.flatnonzero(curve >= level)
    return int(counts[hit[0]]) if len(hit) else None


def plot_curves(counts, curves: dict[str, np.ndarray], path: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    labels = {
        "active": "active (BALD), refined posterior",
        "random": "random, refined posterior",
        "active_encoder_only": "active (BALD), encoder posterior",
    }
    for name, runs in curves.items():
        mean, se = runs.mean(0), runs.std(0) / np.sqrt(len(runs))
        ax.plot(counts, mean, marker="o", ms=3, label=labels.get(name, name))
        ax.fill_between(counts, mean - se, mean + se, alpha=0.25)
    ax.set_xlabel("ratings given by the new rater")
    ax.set_ylabel("pairwise accuracy vs gold utility (mean ± s.e.)")
    ax.set_title("Latent head: active vs random querying (toy world)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.text(0.01, 0.01, note, fontsize=6, alpha=0.7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- 3. the FLICKR-AES protocol -------------------------------------------------------------------
def flickr_aes_protocol(path: str, clip_model: str, ks=(10, 100), device: str = "cpu") -> dict:
    """The FLICKR-AES few-shot figures for a local copy of the data set (not run here: no data).

    `path` is the worker CSV or its folder; `clip_model` e.g. "ViT-L-14" with cached weights or
    "local-dir:DIR". Features are extracted once and cached under `path`/features.
    """
    from reward_models.workflow import ClipConfig, features_for

    data = load_ratings(path, format="flickr_aes")
    feats = features_for(data, ClipConfig(model=clip_model, device=device), Path(path) / "features")
    results = few_shot_protocol(
        data,
        lambda names: feats.matrix[feats.rows(names)],
        train_cfg=LatentTrainConfig(progress=True, device=device),
        ks=ks,
    )
    return {f"k{k}": _protocol_figures(r) for k, r in results.items()}


def _protocol_figures(result: FewShotResult) -> dict:
    keys = (
        "n_raters",
        "spearman",
        "pairwise_accuracy",
        "prior_spearman",
        "prior_pairwise_accuracy",
    )
    return {key: getattr(result, key) for key in keys}


# ---- 4./5. groups: EM mixture of heads and the MDN head ------------------------------------------
def alignment(labels, utilities: torch.Tensor, toy: Toy, eval_idx) -> dict:
    """Match found groups to gold clusters (Hungarian on rater counts) and correlate utilities.

    labels [R] found group per rater; utilities [N_eval, K'] each group's predicted utility.
    """
    labels = np.asarray(labels)
    k_found, k_gold = int(labels.max()) + 1, len(toy.world.raters.cluster_names)
    counts = np.zeros((k_found, k_gold))
    np.add.at(counts, (labels, toy.cluster), 1)
    rows, cols = linear_sum_assignment(-counts)
    per_cluster = {}
    for k, c in zip(rows, cols):
        name = toy.world.raters.cluster_names[c]
        per_cluster[name] = {
            "component": int(k),
            "raters_agreeing": int(counts[k, c]),
            "raters_in_cluster": int((toy.cluster == c).sum()),
            "spearman_vs_cluster_utility": spearman(utilities[:, k], toy.gold_cluster[eval_idx, c]),
        }
    return {"ari": adjusted_rand_index(labels, toy.cluster), "per_cluster": per_cluster}


def em_groups(cfg: BenchConfig, toy: Toy, eval_idx) -> dict:
    scores, pairs = tensors(toy, toy.data)
    out = {}
    k_gold = len(toy.world.config.clusters)
    for name, em_cfg in (
        ("k_given", dataclasses.replace(cfg.em, n_components=k_gold)),
        ("k_given_random_init", dataclasses.replace(cfg.em, n_components=k_gold, init="random")),
        ("k_chosen_by_held_out_likelihood", dataclasses.replace(cfg.em, n_components=None)),
    ):
        t0 = time.perf_counter()
        mix = fit_em(scores, pairs, em_cfg)
        with torch.no_grad():
            util = torch.stack(
                [mix.score(toy.features[eval_idx], k) for k in range(len(mix.heads))], 1
            )
        out[name] = {
            "k": len(mix.heads),
            "held_out_ll_per_rating": mix.held_out,
            "weights": [round(w, 3) for w in mix.weights.tolist()],
            "iterations": len(mix.log_likelihood),
            "seconds": round(time.perf_counter() - t0, 1),
            **alignment(mix.labels.numpy(), util, toy, eval_idx),
        }
    return out


def mdn_groups(cfg: BenchConfig, toy: Toy, eval_idx) -> dict:
    scores, _ = tensors(toy, toy.data)
    out = {}
    for grouping in ("rater", "rating"):
        t0 = time.perf_counter()
        k = len(toy.world.config.clusters)
        head = build_head(MDNHeadConfig(feature_dim=toy.features.shape[1], n_components=k))
        fit_mdn(head, scores, dataclasses.replace(cfg.mdn_train, grouping=grouping))
        with torch.no_grad():
            ll, raters = rater_log_likelihood(head, scores)
            mean, _, _ = head.components(toy.features[eval_idx])
        labels = np.zeros(len(toy.cluster), dtype=np.int64)
        labels[raters.numpy()] = ll.argmax(-1).numpy()
        out[f"grouping_{grouping}"] = {
            "seconds": round(time.perf_counter() - t0, 1),
            **alignment(labels, mean, toy, eval_idx),
        }
    return out


# ---- main ---------------------------------------------------------------------------------------
def run(cfg: BenchConfig, out_dir: Path, name: str = "few_shot_toy") -> dict:
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    toy = build_toy(cfg)
    n_images = len(toy.world.image_names)
    perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(cfg.seed))
    eval_idx, pool_idx = perm[: cfg.eval_images], perm[cfg.eval_images :][: cfg.query_pool]
    train, test = split_by_rater(toy.data, cfg.test_raters, cfg.seed)
    print(
        f"features: {toy.feature_note}; {len(train.rater_ids)} training / "
        f"{len(test.rater_ids)} held-out raters"
    )

    heads = train_heads(cfg, toy, train)
    latent: LatentHead = heads["latent"]
    s_test, _ = tensors(toy, test)
    diag = diagnose(latent, s_test, context_size=10)
    few_shot = few_shot_table(cfg, toy, heads, test, eval_idx)
    print(json.dumps(few_shot, indent=1))

    t0 = time.perf_counter()
    counts, curves = query_curves(cfg, toy, latent, test.rater_ids, eval_idx, pool_idx)
    mean_curves = {k: v.mean(0) for k, v in curves.items()}
    plot_path = out_dir / f"{name}_active.png"
    plot_curves(counts, curves, plot_path, toy.feature_note)
    final_random = float(mean_curves["random"][-1])
    querying = {
        "counts": counts,
        "mean_accuracy": {k: [round(float(a), 4) for a in v] for k, v in mean_curves.items()},
        "runs": {k: len(v) for k, v in curves.items()},
        # the fewest ratings at which each strategy matches what random reaches with query_max
        "ratings_to_reach_random_final": {
            k: ratings_to_reach(counts, v, final_random - 1e-9) for k, v in mean_curves.items()
        },
        "level_random_final": round(final_random, 4),
        "seconds": round(time.perf_counter() - t0, 1),
        "plot": str(plot_path),
    }
    print(json.dumps(querying, indent=1))

    # the FLICKR-AES protocol on the toy tables, as loaded by the data adapters: the trained
    # head adapts on k of each held-out rater's scored images and predicts their other scores
    def features_of(names):
        return toy.features[toy.rows(names)]

    protocol = {
        f"k{k}": _protocol_figures(
            few_shot_eval(latent, test.scores, features_of, k=k, seed=cfg.seed)
        )
        for k in cfg.ks
    }

    em = em_groups(cfg, toy, eval_idx)
    print(json.dumps(em, indent=1))
    mdn = mdn_groups(cfg, toy, eval_idx)
    print(json.dumps(mdn, indent=1))
    return {
        "features": toy.feature_note,
        "world": {
            "n_raters": cfg.world.n_raters,
            "n_images": n_images,
            "scores_per_rater": cfg.world.scores_per_rater,
            "pairs_per_rater": cfg.world.pairs_per_rater,
        },
        "split": {
            "train_raters": len(train.rater_ids),
            "test_raters": len(test.rater_ids),
            "eval_images": len(eval_idx),
            "query_pool": len(pool_idx),
        },
        "few_shot_vs_gold": few_shot,
        "latent_diagnostics_k10": {
            **{k: v for k, v in dataclasses.asdict(diag).items() if k != "mean_variance"},
            "mean_variance": [round(v, 4) for v in diag.mean_variance],
            "gap": diag.gap,
        },
        "latent_training": {
            "best_step": heads["history"].best_step,
            "stopped_early": heads["history"].stopped_early,
        },
        "active_vs_random": querying,
        "protocol_own_scores": protocol,
        "em_mixture": em,
        "mdn": mdn,
        "seconds": {
            **{k: round(v, 1) for k, v in heads["seconds"].items()},
            "total": round(time.perf_counter() - t_start, 1),
        },
        "config": to_dict(cfg),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer raters and steps")
    parser.add_argument("--features", choices=("toy_clip", "pixel_stats"), default="toy_clip")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a shared 2-core machine; the models are tiny
    cfg = BenchConfig(features=args.features)
    if args.quick:
        cfg.world = ToyWorldConfig(n_raters=60)
        cfg.latent_train = LatentTrainConfig(steps=600, kl_anneal_steps=300)
        cfg.query_seeds, cfg.query_max = 1, 12
        cfg.em = dataclasses.replace(cfg.em, max_components=4)
        cfg.mdn_train = MDNTrainConfig(epochs=60)
    name = "few_shot_toy_quick" if args.quick else "few_shot_toy"
    result = run(cfg, args.out, name)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / name}.json")


if __name__ == "__main__":
    main()
