"""New users from a few ratings (toy world): the gold utility of the images made for them.

    python benchmarks/new_users_toy.py                      # seeds 0 1 2, 4 new raters per cluster
    python benchmarks/new_users_toy.py --seeds 0 --raters-per-cluster 1 --ks 3 10   # a smoke run

For each seed S the demo's own stages are built or reused from the cache: the toy world, its
reward heads, a toy base and the `mean` and `matched` policies of
`plural-diffusion demo prepare.base.seed=S "train_overrides=[seed=S]"`. Then new gold raters,
drawn from every taste cluster of the world with the world's own jitter and reporting model
(offset, scale, noise, 0-10 rounding) but never seen by the heads or the policies, each rate
k = 3, 5, 10, 20 of the world's images, chosen
  random   in a random order, or
  active   two at random, then one at a time by BALD (`plural_diffusion.new_user.next_query`).
Their taste is inferred as `generate --ratings` infers it (`plural_diffusion.new_user`) and the
matched policy generates for it on the demo's evaluation prompts and seeds. Measured with each
rater's own gold utility: the mean utility of their images, the win rate against the `mean`
policy's and the base model's image on the same prompt and noise (ties within 0.005 count one
half, as in `plural_diffusion.evaluate.win_rates`), and the gap to the oracle (the matched policy
asked for the rater's own gold cluster). Per cluster: median and range over seeds of the mean
over that cluster's new raters.

Writes benchmarks/results/new_users_toy.json and new_users_toy.png (or --tag'd names).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from plural_diffusion.cache import cache_root
from plural_diffusion.configs import config_path
from plural_diffusion.demo import DemoConfig, stage_policy, stage_rewards
from plural_diffusion.evaluate import gold_in_head_order
from plural_diffusion.experts import expert_gates, routing_temperature
from plural_diffusion.generate import Taste, generate_images
from plural_diffusion.new_user import infer_taste, next_query
from plural_diffusion.policy import CheckpointInfo, SamplingOverrides, TastePolicy, resolve_settings
from plural_diffusion.rewards import TasteRewards
from plural_diffusion.toyworld.prepare import prepare_toy
from plural_diffusion.toyworld.raters import GoldRaters, gold_utility, make_raters
from plural_diffusion.toyworld.ratings import load_world
from reward_models.config import load_config

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("random", "active")
TIE_MARGIN = 0.005  # as `plural_diffusion.evaluate.win_rates`


@dataclass
class BenchConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    raters_per_cluster: int = 4
    ks: list[int] = field(default_factory=lambda: [3, 5, 10, 20])
    query_start: int = 2  # random images before the active query takes over
    query_pool: int = 300  # candidate images a new rater may be asked about
    # new raters are drawn with seed rater_seed + 100 * S + cluster, not the world's raters' seed
    rater_seed: int = 10_000
    goal_k: int = 10


# ---- the demo's stages for one seed ----------------------------------------------------------
def seed_stages(seed: int) -> dict:
    """The demo's world, reward run and mean / matched policies for seed S (cached stages)."""
    cfg = load_config(
        DemoConfig,
        config_path("demo.yaml"),
        [f"prepare.base.seed={seed}", f"train_overrides=[seed={seed}]"],
    )
    root = cache_root()
    assets = prepare_toy(cfg.prepare, root=root, progress=False)
    run = stage_rewards(cfg, assets, root)
    world = load_world(assets.world)
    # the trainer logs gold utility per cluster, in the order of the run's clusters
    gold_fn = gold_in_head_order(world, TasteRewards(str(run)).cluster_names)
    policies = {
        p: stage_policy(cfg, p, assets.base, run, gold_fn, root) / "policy"
        for p in ("mean", "matched")
    }
    return {"cfg": cfg, "base": assets.base, "run": run, "world": world, "policies": policies}


# ---- new raters ---------------------------------------------------------------------------------
@dataclass
class NewRaters:
    raters: GoldRaters  # [U] with cluster indices into the world's clusters
    offset: torch.Tensor  # [U] harsh/generous offset, score points
    scale: torch.Tensor  # [U]


def new_raters(world, per_cluster: int, seed: int) -> NewRaters:
    """`per_cluster` new gold raters of every cluster, jittered as the world's own raters are,
    with reporting drawn from the world's distributions (`toyworld.ratings._reporting`)."""
    wcfg = world.config
    ideal, precision, cluster, ids = [], [], [], []
    for k, spec in enumerate(wcfg.clusters):
        r = make_raters(per_cluster, [spec], jitter=wcfg.taste_jitter, seed=seed + k)
        ideal.append(r.ideal)
        precision.append(r.precision)
        cluster += [k] * per_cluster
        ids += [f"new_{spec.name}_{i}" for i in range(per_cluster)]
    g = torch.Generator().manual_seed(seed + 99)
    n = len(ids)
    raters = GoldRaters(
        list(wcfg.clusters), torch.tensor(cluster), torch.cat(ideal), torch.cat(precision), ids
    )
    offset = wcfg.offset_sd * torch.randn(n, generator=g)
    scale = torch.exp(wcfg.scale_sd * torch.randn(n, generator=g))
    return NewRaters(raters, offset, scale)


def rate(world, users: NewRaters, u: int, utility: torch.Tensor, g: torch.Generator):
    """Scores [n] rater u gives images of gold utility [n] for them, as the world's raters do."""
    latent = 1.0 + 8.0 * utility
    noise = world.config.score_noise * torch.randn(len(utility), generator=g)
    return (users.offset[u] + users.scale[u] * latent + noise).round().clamp(0, 10) + 0.0


# ---- asking ----------------------------------------------------------------------------------
def ask(bench, rewards, pool_features, scores, strategy: str, g: torch.Generator, seed: int):
    """{k: InferredTaste} after k ratings, for every k in bench.ks; `scores` [M] are the rater's
    answers for every pool image (each asked at most once)."""
    order = torch.randperm(len(pool_features), generator=g).tolist()
    out = {}
    if strategy == "random":
        for k in bench.ks:
            rows = order[:k]
            out[k] = infer_taste(rewards, pool_features[rows], scores[rows], seed=seed)
        return out
    asked = order[: bench.query_start]
    while True:
        taste = infer_taste(rewards, pool_features[asked], scores[asked], seed=seed)
        if len(asked) in bench.ks:
            out[len(asked)] = taste
        if len(asked) >= max(bench.ks):
            return out
        left = [i for i in range(len(pool_features)) if i not in set(asked)]
        pick = next_query(rewards, taste, pool_features[left], pool_features[asked], seed=seed)
        asked.append(left[pick])


def win_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of pairs where a beats b, ties within TIE_MARGIN counting one half."""
    wins, ties = (a > b + TIE_MARGIN).float(), ((a - b).abs() <= TIE_MARGIN).float()
    return float((wins + 0.5 * ties).mean())


# ---- one seed --------------------------------------------------------------------------------
def run_seed(bench: BenchConfig, seed: int) -> dict:
    t0 = time.perf_counter()
    st = seed_stages(seed)
    world, cfg = st["world"], st["cfg"]
    matched_info = CheckpointInfo.read(st["policies"]["matched"])
    rewards = TasteRewards(str(st["run"]), space=matched_info.taste_space)
    names = rewards.cluster_names
    gold_names = world.raters.cluster_names
    users = new_raters(world, bench.raters_per_cluster, bench.rater_seed + 100 * seed)

    # the images new raters are asked about, as the PNG files hold them
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(len(world.image_names), generator=g)[: bench.query_pool]
    pool_images = (world.images.images[pool] * 255).round() / 255
    pool_features = rewards.encoder.encode_images(pool_images, progress=False)
    pool_gold = gold_utility(pool_images, users.raters)  # [M, U]

    # how a taste mixes the policy's taste-routed LoRA experts (`plural_diffusion.experts`)
    centroids = rewards.cluster_tastes.cpu()
    temperature = routing_temperature(centroids)
    tastes: list[Taste] = []  # what the matched policy is asked for, one per (user, strategy, k)
    rows = []
    bar = tqdm(total=len(users.raters.ids) * len(STRATEGIES), desc=f"seed {seed}: asking")
    for u, rater in enumerate(users.raters.ids):
        answers = rate(
            world, users, u, pool_gold[:, u], torch.Generator().manual_seed(7 * u + seed)
        )
        for strategy in STRATEGIES:
            g = torch.Generator().manual_seed(1000 * seed + u)  # the same first images for both
            for k, taste in ask(bench, rewards, pool_features, answers, strategy, g, seed).items():
                nearest = taste.nearest_clusters(names)[0]
                own = names.index(gold_names[int(users.raters.cluster[u])])
                gates = expert_gates(taste.z[None], centroids, temperature)[0]
                rows.append(
                    {
                        "rater": rater,
                        "cluster": gold_names[int(users.raters.cluster[u])],
                        "strategy": strategy,
                        "k": k,
                        "nearest_cluster": nearest[0],
                        "nearest_probability": round(nearest[1], 3),
                        "own_expert_gate": float(gates[own]),
                        "taste": len(tastes),
                    }
                )
                tastes.append(Taste(f"{rater} {strategy} k{k}", "ratings", taste.z))
            bar.update()
    bar.close()

    # generation: the users' tastes and the oracle (every cluster) with the matched policy,
    # the mean policy and the base once; the same prompts and seeds for all
    prompts, seeds = cfg.eval.prompts, cfg.eval.seeds
    oracle = [
        Taste(n, f"cluster:{n}", rewards.cluster_tastes[k].cpu()) for k, n in enumerate(names)
    ]
    images = {}
    matched = TastePolicy.from_pretrained(str(st["base"]), st["policies"]["matched"])
    settings = matched.settings(SamplingOverrides())
    batch = cfg.eval.batch_size
    x = generate_images(matched, prompts, oracle + tastes, seeds, settings, batch)
    images["oracle"] = {n: x[k].flatten(0, 1) for k, n in enumerate(names)}
    images["users"] = x[len(oracle) :].flatten(1, 2)  # [T, P * S, 3, H, W]
    del matched
    mean = TastePolicy.from_pretrained(str(st["base"]), st["policies"]["mean"])
    images["mean"] = generate_images(
        mean,
        prompts,
        [Taste("mean", "mean", None)],
        seeds,
        mean.settings(SamplingOverrides()),
        batch,
    )[0].flatten(0, 1)
    del mean
    base = TastePolicy.from_pretrained(str(st["base"]), None)
    base_settings = resolve_settings(
        SamplingOverrides(), matched_info.trained, "checkpoint matched"
    )
    images["base"] = generate_images(
        base, prompts, [Taste("mean", "mean", None)], seeds, base_settings, batch
    )[0].flatten(0, 1)
    del base

    # scoring, each image by the user's own gold utility
    mean_gold = gold_utility(images["mean"], users.raters)  # [N, U]
    base_gold = gold_utility(images["base"], users.raters)
    oracle_gold = {n: gold_utility(x, users.raters) for n, x in images["oracle"].items()}
    per_user = {}
    for u, rater in enumerate(users.raters.ids):
        own = gold_names[int(users.raters.cluster[u])]
        per_user[rater] = {
            "cluster": own,
            "oracle": float(oracle_gold[own][:, u].mean()),
            "mean_policy": float(mean_gold[:, u].mean()),
            "base": float(base_gold[:, u].mean()),
        }
    for row in rows:
        u = users.raters.ids.index(row["rater"])
        mine = gold_utility(images["users"][row.pop("taste")], users.raters)[:, u]  # [N]
        ref = per_user[row["rater"]]
        row["gold"] = float(mine.mean())
        row["win_vs_mean"] = win_rate(mine, mean_gold[:, u])
        row["win_vs_base"] = win_rate(mine, base_gold[:, u])
        row["gap_to_oracle"] = ref["oracle"] - row["gold"]
        # the same user asked by their most probable cluster's taste (a taste the policy was
        # trained on): those are the oracle images of that cluster, already generated
        near = oracle_gold[row["nearest_cluster"]][:, u]
        row["gold_nearest"] = float(near.mean())
        row["win_vs_mean_nearest"] = win_rate(near, mean_gold[:, u])
        row["win_vs_base_nearest"] = win_rate(near, base_gold[:, u])
        row["gap_to_oracle_nearest"] = ref["oracle"] - row["gold_nearest"]
    return {
        "seed": seed,
        "clusters": names,
        "shares": [round(float(s), 3) for s in rewards.cluster_shares],
        "taste_space": rewards.space,
        "users": per_user,
        "rows": rows,
        "images_per_user": len(prompts) * len(seeds),
        "seconds": round(time.perf_counter() - t0, 1),
    }


# ---- summary ---------------------------------------------------------------------------------
FIGURES = ("gold", "win_vs_mean", "win_vs_base", "gap_to_oracle")
TASTES = ("", "_nearest")  # the fitted taste; the most probable cluster's taste


def _spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def summarise(bench: BenchConfig, seeds: list[dict]) -> dict:
    """Per cluster, strategy and k: median and range over seeds of the mean over new raters."""
    out: dict = {}
    for c in seeds[0]["clusters"]:
        out[c] = {
            "reference": {
                ref: _spread(
                    [
                        statistics.fmean(v[ref] for v in s["users"].values() if v["cluster"] == c)
                        for s in seeds
                    ]
                )
                for ref in ("oracle", "mean_policy", "base")
            }
        }
        for strategy in STRATEGIES:
            for k in bench.ks:
                figures = [f + t for t in TASTES for f in FIGURES] + ["own_expert_gate"]
                per_seed = {f: [] for f in (*figures, "nearest_is_own")}
                for s in seeds:
                    mine = [
                        r
                        for r in s["rows"]
                        if r["cluster"] == c and r["strategy"] == strategy and r["k"] == k
                    ]
                    for f in figures:
                        per_seed[f].append(statistics.fmean(r[f] for r in mine))
                    per_seed["nearest_is_own"].append(
                        statistics.fmean(r["nearest_cluster"] == c for r in mine)
                    )
                out[c][f"{strategy}_k{k}"] = {f: _spread(v) for f, v in per_seed.items()}
    return out


def goal(bench: BenchConfig, summary: dict, seeds: list[dict]) -> dict:
    """At `goal_k` ratings, per minority cluster and strategy: median win rate vs mean >= 0.8
    and median gap to the oracle <= 0.05."""
    shares = dict(zip(seeds[0]["clusters"], seeds[0]["shares"]))
    major = max(shares, key=shares.get)
    out = {}
    for c in shares:
        if c == major:
            continue
        for strategy in STRATEGIES:
            for taste, label in zip(TASTES, ("fitted", "nearest_cluster")):
                cell = summary[c][f"{strategy}_k{bench.goal_k}"]
                win = cell["win_vs_mean" + taste]["median"]
                gap = cell["gap_to_oracle" + taste]["median"]
                out[f"{c}/{strategy}/{label}"] = {
                    "win_vs_mean": win,
                    "gap_to_oracle": gap,
                    "beats_mean_80": win >= 0.8,
                    "within_0.05_of_oracle": gap <= 0.05,
                }
    return out


def markdown(bench: BenchConfig, summary: dict) -> str:
    """The README table: median [min, max] over seeds."""

    def cell(s):
        return f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"

    lines = [
        "| cluster | oracle (own cluster asked) | `mean` policy | base |",
        "|---|---|---|---|",
    ]
    for c, v in summary.items():
        ref = v["reference"]
        lines.append(
            f"| {c} | {cell(ref['oracle'])} | {cell(ref['mean_policy'])} | {cell(ref['base'])} |"
        )
    lines += [
        "",
        "| cluster | ratings | query | gold utility | win vs `mean` | win vs base "
        "| gap to oracle | own expert's gate | nearest cluster = own "
        "| gold, nearest cluster's taste | win vs `mean`, nearest | gap to oracle, nearest |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, v in summary.items():
        for k in bench.ks:
            for strategy in STRATEGIES:
                x = v[f"{strategy}_k{k}"]
                lines.append(
                    f"| {c} | {k} | {strategy} | {cell(x['gold'])} | {cell(x['win_vs_mean'])} "
                    f"| {cell(x['win_vs_base'])} | {cell(x['gap_to_oracle'])} "
                    f"| {x['own_expert_gate']['median']:.2f} "
                    f"| {x['nearest_is_own']['median']:.2f} | {cell(x['gold_nearest'])} "
                    f"| {cell(x['win_vs_mean_nearest'])} | {cell(x['gap_to_oracle_nearest'])} |"
                )
    return "\n".join(lines)


def plot(bench: BenchConfig, summary: dict, path: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clusters = list(summary)
    fig, axes = plt.subplots(1, len(clusters), figsize=(3.6 * len(clusters), 3.3), sharey=True)
    colours = {"random": "#9333ea", "active": "#2563eb"}
    for ax, c in zip(axes, clusters):
        for strategy in STRATEGIES:
            med = [summary[c][f"{strategy}_k{k}"]["gold"]["median"] for k in bench.ks]
            lo = [summary[c][f"{strategy}_k{k}"]["gold"]["min"] for k in bench.ks]
            hi = [summary[c][f"{strategy}_k{k}"]["gold"]["max"] for k in bench.ks]
            ax.plot(bench.ks, med, marker="o", color=colours[strategy], label=f"{strategy}, fitted")
            ax.fill_between(bench.ks, lo, hi, color=colours[strategy], alpha=0.15)
            near = [summary[c][f"{strategy}_k{k}"]["gold_nearest"]["median"] for k in bench.ks]
            ax.plot(
                bench.ks,
                near,
                marker="x",
                ls="--",
                color=colours[strategy],
                label=f"{strategy}, nearest cluster",
            )
        ref = summary[c]["reference"]
        for name, colour, style in (
            ("oracle", "#059669", "-"),
            ("mean_policy", "#ea580c", "--"),
            ("base", "#6b7280", ":"),
        ):
            ax.axhline(ref[name]["median"], color=colour, ls=style, lw=1.2, label=name)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(bench.ks, [str(k) for k in bench.ks])
        ax.set_title(c)
        ax.set_xlabel("ratings by the new rater")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("the rater's gold utility of their images")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("New raters: median and range over seeds", fontsize=10)
    fig.text(0.01, 0.01, note, fontsize=6, alpha=0.7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--raters-per-cluster", type=int, default=4)
    p.add_argument("--ks", type=int, nargs="+", default=[3, 5, 10, 20])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="suffix for the result files")
    p.add_argument("--replot", action="store_true", help="redraw the plot from the saved JSON")
    args = p.parse_args(argv)
    stem = "new_users_toy" + (f"-{args.tag}" if args.tag else "")
    if args.replot:
        saved = json.loads((args.out / f"{stem}.json").read_text())
        bench = BenchConfig(**saved["config"])
        plot(bench, saved["summary"], args.out / f"{stem}.png", saved["command"])
        print(f"redrew {args.out / stem}.png from {stem}.json")
        return
    if min(args.ks) < 2:
        raise SystemExit("--ks: a taste needs at least 2 ratings")
    torch.set_num_threads(1)  # a shared 2-core machine; the models are tiny
    bench = BenchConfig(
        seeds=args.seeds, raters_per_cluster=args.raters_per_cluster, ks=sorted(args.ks)
    )
    bench.goal_k = 10 if 10 in bench.ks else bench.ks[-1]
    seeds = []
    for seed in bench.seeds:
        seeds.append(run_seed(bench, seed))
        print(f"seed {seed}: {seeds[-1]['seconds']} s", flush=True)
    summary = summarise(bench, seeds)
    command = "python benchmarks/new_users_toy.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    stem = "new_users_toy" + (f"-{args.tag}" if args.tag else "")
    result = {
        "command": command.strip(),
        "config": {**bench.__dict__},
        "summary": summary,
        "goal": goal(bench, summary, seeds),
        "table_md": markdown(bench, summary),
        "seeds": seeds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(bench, summary, args.out / f"{stem}.png", command)
    print(result["table_md"])
    print(json.dumps(result["goal"], indent=1))
    print(f"wrote {args.out / (stem + '.json')} and {stem}.png")


if __name__ == "__main__":
    main()
