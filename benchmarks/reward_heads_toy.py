"""Benchmark: mean head vs rater-aware head on the toy world, against gold utilities.

Measures (written to benchmarks/results/reward_heads_toy.json and printed as a table):
  * held-out pairwise accuracy and Spearman per gold cluster on the raters' noisy held-out
    scores, for the mean head and the rater head, next to the label-noise ceiling: the accuracy
    the raters' *gold* utilities themselves reach on those noisy scores (no model can do better
    in expectation);
  * the same against the gold utilities directly, on every held-out image;
  * how well discovered taste clusters match the gold clusters (adjusted Rand index), with K
    given and with K chosen by BIC.

    python benchmarks/reward_heads_toy.py [--out DIR] [key=value overrides of the reward config]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from plural_diffusion.configs import CONFIGS
from plural_diffusion.toyworld.prepare import ToyPrepareConfig, prepare_toy
from plural_diffusion.toyworld.raters import gold_utility
from plural_diffusion.toyworld.ratings import load_world
from reward_models.clusters import ClusterConfig, fit_clusters
from reward_models.config import load_config
from reward_models.data import split_by_image
from reward_models.metrics import adjusted_rand_index, pairwise_accuracy, spearman
from reward_models.workflow import (
    RewardTrainConfig,
    evaluate,
    features_for,
    load_data,
    load_run,
    train,
)

HERE = Path(__file__).resolve().parent


def per_cluster(values: dict[int, float], cluster_of: list[str]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for r, v in values.items():
        if not np.isnan(v):
            out.setdefault(cluster_of[r], []).append(v)
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(out.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/reward_heads_toy"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    assets = prepare_toy(ToyPrepareConfig(), stages=("world", "clip"))
    world = load_world(assets.world)
    cfg = load_config(
        RewardTrainConfig,
        CONFIGS / "reward-toy.yaml",
        [
            f"data.path={assets.world}",
            f"data.rater_info={assets.world / 'raters.csv'}",
            f"clip.model=local-dir:{assets.clip}",
            f"out_dir={args.out / 'run'}",
            *args.overrides,
        ],
    )
    train(cfg)
    metrics = evaluate(cfg.out_dir)
    run = load_run(cfg.out_dir)

    # ---- gold comparisons on held-out images
    data = load_data(cfg.data)
    _, test = split_by_image(data, cfg.split.test_images, cfg.split.seed)
    feats = features_for(data, cfg.clip, Path(cfg.out_dir).parent / "features")
    image_index = {name: i for i, name in enumerate(world.image_names)}
    gold_all = gold_utility(world.images.images, world.raters)  # [N, R_world]
    world_rater = {rid: i for i, rid in enumerate(world.raters.ids)}
    cluster_of = [
        world.raters.cluster_names[world.raters.cluster[world_rater[r]]] for r in run.rater_ids
    ]

    df = test.scores.df
    ceiling, model_noisy = {}, {"mean": {}, "rater": {}}
    test_images = sorted(df["image"].unique())
    x_test = feats.matrix[feats.rows(test_images)]
    gold_test = gold_all[[image_index[i] for i in test_images]]  # [T, R_world]
    model_gold = {"mean": {}, "rater": {}}
    with torch.no_grad():
        mean_scores = run.mean.score(x_test, None)
        for r, rid in enumerate(run.rater_ids):
            rows = df[df["rater_id"] == rid]
            if len(rows) < 2:
                continue
            pos = [test_images.index(i) for i in rows["image"]]
            noisy = rows["score"].to_numpy()
            rater_scores = run.rater.score(
                x_test, run.rater.taste_of(torch.full((len(test_images),), r))
            )
            gold_r = gold_test[:, world_rater[rid]]
            ceiling[r] = pairwise_accuracy(gold_r[pos], noisy)
            model_noisy["mean"][r] = pairwise_accuracy(mean_scores[pos], noisy)
            model_noisy["rater"][r] = pairwise_accuracy(rater_scores[pos], noisy)
            model_gold["mean"][r] = pairwise_accuracy(mean_scores, gold_r)
            model_gold["rater"][r] = pairwise_accuracy(rater_scores, gold_r)
            model_gold.setdefault("rater_spearman", {})[r] = spearman(rater_scores, gold_r)
            model_gold.setdefault("mean_spearman", {})[r] = spearman(mean_scores, gold_r)

    # ---- clusters: K given (config) and K by BIC
    gold_labels = cluster_of
    bic = fit_clusters(run.rater.rater_tastes(), ClusterConfig(n_clusters=None, seed=0))
    result = {
        "noisy_heldout_pairwise_accuracy": {
            "noise_ceiling": per_cluster(ceiling, cluster_of),
            "mean_head": per_cluster(model_noisy["mean"], cluster_of),
            "rater_head": per_cluster(model_noisy["rater"], cluster_of),
        },
        "gold_pairwise_accuracy": {
            "mean_head": per_cluster(model_gold["mean"], cluster_of),
            "rater_head": per_cluster(model_gold["rater"], cluster_of),
        },
        "gold_spearman": {
            "mean_head": per_cluster(model_gold["mean_spearman"], cluster_of),
            "rater_head": per_cluster(model_gold["rater_spearman"], cluster_of),
        },
        "cluster_ari_k_given": adjusted_rand_index(run.clusters.labels.tolist(), gold_labels),
        "cluster_k_by_bic": len(bic),
        "cluster_ari_k_by_bic": adjusted_rand_index(bic.labels.tolist(), gold_labels),
        "eval_metrics": metrics,
        "n_raters": len(run.rater_ids),
        "n_test_images": len(test_images),
        "seconds": round(time.perf_counter() - t0, 1),
        "torch_threads": 1,
    }
    out = HERE / "results" / "reward_heads_toy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    clusters = list(result["noisy_heldout_pairwise_accuracy"]["noise_ceiling"])
    print("| pairwise accuracy | " + " | ".join(clusters) + " |")
    print("|---|" + "---|" * len(clusters))
    rows = [
        (
            "noise ceiling (gold utility vs noisy held-out scores)",
            result["noisy_heldout_pairwise_accuracy"]["noise_ceiling"],
        ),
        (
            "mean head, noisy held-out scores",
            result["noisy_heldout_pairwise_accuracy"]["mean_head"],
        ),
        (
            "rater head, noisy held-out scores",
            result["noisy_heldout_pairwise_accuracy"]["rater_head"],
        ),
        ("mean head vs gold utility", result["gold_pairwise_accuracy"]["mean_head"]),
        ("rater head vs gold utility", result["gold_pairwise_accuracy"]["rater_head"]),
    ]
    for name, values in rows:
        print(f"| {name} | " + " | ".join(f"{values[c]:.3f}" for c in clusters) + " |")
    print(
        f"\nclusters vs gold: ARI {result['cluster_ari_k_given']:.3f} with K=3 given; "
        f"BIC picks K={result['cluster_k_by_bic']} (ARI {result['cluster_ari_k_by_bic']:.3f})"
    )
    print(f"wrote {out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
