"""Would keeping the better of two matched runs per seed, judged by the reward heads alone,
pass more of the plural claims? Reads two `demo_seeds.py` output folders made on the same toy
bases with different policy seeds, e.g.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --out outputs/runs-a
    python benchmarks/demo_seeds.py --seeds 0 1 2 --out outputs/runs-b "train_overrides=[seed=1077]"
    python benchmarks/best_of_runs.py outputs/runs-a/default outputs/runs-b/default --seeds 0 1 2

(`--tag T` puts a run's demos under FOLDER/default/T.) Each seed's pick is the run whose
`matched` images have the larger worst-off own-head gain: for each taste, its head's mean score
on the images made for it minus the base model's, relative to the better of the two runs'
gain; the smallest over tastes. Both runs' `matched` are checked against run A's `mean`, so
the baseline stays fixed. Prints a line per seed and the checks passed per choice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from demo_seeds import checks, summarise

CLAIMS = ("minority", "majority", "diagonal", "smallest", "looks")


def seed_metrics(root: Path, seed: int) -> dict:
    path = root / f"seed-{seed}" / "metrics.json"
    if not path.is_file():
        raise SystemExit(
            f"{path}: not found; give the folder that holds seed-N/ of a demo_seeds run"
        )
    return json.loads(path.read_text())


def claims(run: dict, baseline: dict) -> dict[str, bool]:
    """`demo_seeds.checks` on `run`'s matched policy against `baseline`'s mean policy."""
    row = summarise(run)
    row["gold"]["mean"] = summarise(baseline)["gold"]["mean"]
    row["seconds"] = 0.0
    return {name: ok for name, ok in checks(row).items() if name in CLAIMS}


def worst_off_gain(runs: list[dict]) -> list[float]:
    """Per run: min over tastes k of (head k on k's images - head k on the base's), divided by
    the largest such gain among the runs."""
    names = runs[0]["clusters"]["names"]
    base = [runs[0]["policies"]["base"]["reward_per_cluster"][n] for n in names]
    own = [
        [r["policies"]["matched"]["cross_taste_reward"][k][k] for k in range(len(names))]
        for r in runs
    ]
    top = [max(o[k] for o in own) for k in range(len(names))]
    return [
        min((o[k] - base[k]) / max(top[k] - base[k], 1e-9) for k in range(len(names))) for o in own
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    args = p.parse_args(argv)
    passed = {choice: dict.fromkeys(CLAIMS, 0) for choice in ("a", "b", "pick")}
    for seed in args.seeds:
        a, b = seed_metrics(args.run_a, seed), seed_metrics(args.run_b, seed)
        score = worst_off_gain([a, b])
        pick = "a" if score[0] >= score[1] else "b"
        result = {"a": claims(a, a), "b": claims(b, a)}
        result["pick"] = result[pick]
        for choice, ok in result.items():
            for name in CLAIMS:
                passed[choice][name] += int(ok[name])
        failed = {c: [n for n in CLAIMS if not result[c][n]] for c in ("a", "b")}
        print(
            f"seed {seed}: worst-off gain a {score[0]:.3f} b {score[1]:.3f}, pick {pick}; "
            f"failed a {failed['a'] or 'none'}, b {failed['b'] or 'none'}"
        )
    for choice, counts in passed.items():
        print(f"{choice}: {counts} of {len(args.seeds)}")


if __name__ == "__main__":
    main()
