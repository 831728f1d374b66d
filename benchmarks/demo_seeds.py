"""Is every taste served on every seed? The full demo per seed, and the plural claims checked.

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 [--method ddpo] [--jobs 2] [key=value ...]

Each seed S runs `plural-diffusion demo prepare.base.seed=S "train_overrides=[seed=S, ...]"`
in a subprocess (a toy base and policies of their own; the toy world, its raters and the reward
heads are the benchmark and stay fixed), reads its metrics.json and checks, per seed:

  minority   matched's gold beats mean's on every minority cluster
  majority   matched's gold >= mean's - 0.01 on the majority cluster
  diagonal   the cross-taste gold matrix is diagonal-dominant in every row and every column
  smallest   the smallest cluster's matched gold >= 0.5 (and the median over seeds >= 0.6)
  maxmin     maxmin's worst-cluster gold is above both the base's and mean's
  looks      matched's within-taste Vendi (mean over tastes) >= 0.8 x the base model's Vendi
  time       the demo took <= 15 minutes

Writes benchmarks/results/demo_seeds[-METHOD][-TAG].json and a plot; prints a line per seed.
Extra `key=value` arguments go to every demo (e.g.
"train_overrides=[lora.experts=false, select_experts=false, restart_experts=false]" to
measure an alternative), and `--tag` names the result files.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from plural_diffusion.evaluate import diagonal_dominance

RESULTS = Path(__file__).resolve().parent / "results"
CHECKS = ("minority", "majority", "diagonal", "smallest", "maxmin", "looks", "time")


def run_seed(seed: int, method: str | None, extra: list[str], out_root: Path) -> dict:
    out = out_root / f"seed-{seed}"
    train = [f"seed={seed}"] + ([f"method={method}"] if method else [])
    rest = []
    for item in extra:  # merge the user's train_overrides into this seed's list
        if item.startswith("train_overrides=["):
            train += [s.strip() for s in item[len("train_overrides=[") : -1].split(",") if s]
        else:
            rest.append(item)
    overrides = [f"prepare.base.seed={seed}", f"train_overrides=[{', '.join(train)}]", *rest]
    cmd = [sys.executable, "-m", "plural_diffusion.cli", "demo", "--out", str(out), *overrides]
    t0 = time.perf_counter()
    log = out_root / f"seed-{seed}.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed}: the demo failed (exit {proc.returncode}); see {log}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"seed": seed, "seconds": round(seconds, 1), **summarise(metrics)}


def summarise(metrics: dict) -> dict:
    """The figures the claims are made of, from one demo's metrics.json."""
    names = metrics["clusters"]["names"]
    shares = metrics["clusters"]["shares"]
    pol = metrics["policies"]
    gold = {p: [pol[p]["gold_per_cluster"][n] for n in names] for p in pol}
    within = pol["matched"]["vendi_within_taste"]
    return {
        "clusters": names,
        "shares": shares,
        "gold": gold,
        "cross_taste_gold": pol["matched"]["cross_taste_gold"],
        "vendi_within_taste": {
            "matched": statistics.fmean(within[n] for n in names),
            "base": pol["base"]["vendi"],
        },
        "worst_gold": {p: min(g) for p, g in gold.items()},
    }


def checks(row: dict) -> dict[str, bool]:
    shares, gold = row["shares"], row["gold"]
    major = max(range(len(shares)), key=shares.__getitem__)
    small = min(range(len(shares)), key=shares.__getitem__)
    minorities = [k for k in range(len(shares)) if k != major]
    dominance = diagonal_dominance(row["cross_taste_gold"])
    out = {
        "minority": all(gold["matched"][c] > gold["mean"][c] for c in minorities),
        "majority": gold["matched"][major] >= gold["mean"][major] - 0.01,
        "diagonal": dominance["all_columns"] and all(dominance["by_row"]),
        "smallest": gold["matched"][small] >= 0.5,
        "looks": row["vendi_within_taste"]["matched"] >= 0.8 * row["vendi_within_taste"]["base"],
        "time": row["seconds"] <= 15 * 60,
    }
    if "maxmin" in gold:
        worst = row["worst_gold"]
        out["maxmin"] = worst["maxmin"] > max(worst["base"], worst["mean"])
    return out


def line(row: dict) -> str:
    g = row["gold"]
    fmt = "/".join
    ok = row["checks"]
    failed = [c for c in CHECKS if c in ok and not ok[c]]
    parts = [
        f"seed {row['seed']}:",
        *(
            f"{p} {fmt(f'{v:.3f}' for v in g[p])}"
            for p in ("base", "mean", "matched", "maxmin")
            if p in g
        ),
        f"vendi-within matched {row['vendi_within_taste']['matched']:.2f} "
        f"base {row['vendi_within_taste']['base']:.2f}",
        f"{row['seconds']:.0f} s",
        "ALL PASS" if not failed else "FAIL " + ",".join(failed),
    ]
    return " | ".join(parts)


def aggregate(rows: list[dict]) -> dict:
    names = rows[0]["clusters"]
    out = {}
    for policy in rows[0]["gold"]:
        out[policy] = {}
        for k, name in enumerate(names):
            v = [r["gold"][policy][k] for r in rows]
            out[policy][name] = {"median": statistics.median(v), "min": min(v), "max": max(v)}
    small = min(range(len(names)), key=rows[0]["shares"].__getitem__)
    out["smallest_median_ok"] = statistics.median(r["gold"]["matched"][small] for r in rows) >= 0.6
    out["passed"] = {c: sum(r["checks"].get(c, False) for r in rows) for c in CHECKS}
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = rows[0]["clusters"]
    policies = [p for p in ("base", "mean", "matched", "maxmin") if p in rows[0]["gold"]]
    colours = {"base": "#9ca3af", "mean": "#ea580c", "matched": "#2563eb", "maxmin": "#059669"}
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.2), sharey=True)
    for k, (ax, name) in enumerate(zip(axes, names)):
        for i, p in enumerate(policies):
            v = [r["gold"][p][k] for r in rows]
            ax.scatter([i] * len(v), v, color=colours[p], s=18, alpha=0.8)
            ax.hlines(statistics.median(v), i - 0.3, i + 0.3, color=colours[p], lw=2)
        ax.set_xticks(range(len(policies)), policies)
        ax.set_title(f"{name} ({rows[0]['shares'][k]:.0%})")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("gold utility of the images made for the cluster")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--method", choices=["draft", "ddpo"], default=None)
    p.add_argument("--jobs", type=int, default=1, help="demos run side by side (one thread each)")
    p.add_argument("--out", type=Path, default=Path("outputs/demo_seeds"))
    p.add_argument("--tag", default="", help="suffix for the result files")
    p.add_argument("overrides", nargs="*", help="key=value for every demo")
    args = p.parse_args()

    out_root = args.out / (args.method or "default") / (args.tag or "main")
    out_root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(run_seed, s, args.method, args.overrides, out_root) for s in args.seeds
        ]
        rows = []
        for future in futures:
            row = future.result()
            row["checks"] = checks(row)
            rows.append(row)
            print(line(row), flush=True)
    summary = aggregate(rows)
    stem = (
        "demo_seeds"
        + (f"-{args.method}" if args.method else "")
        + (f"-{args.tag}" if args.tag else "")
    )
    command = "python benchmarks/demo_seeds.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"command": command, "seeds": rows, "summary": summary}, indent=1) + "\n"
    )
    plot(rows, RESULTS / f"{stem}.png", command)
    print("passed per check (of", len(rows), "seeds):", summary["passed"])
    print("smallest cluster median >= 0.6:", summary["smallest_median_ok"])
    print(f"wrote {RESULTS / (stem + '.json')}")


if __name__ == "__main__":
    main()
