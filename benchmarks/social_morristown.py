"""Morristown over many seeds: incomplete comparisons, pooled pairwise model vs rater head +
simulated electorate + Borda (the world and the measurement are the test's, run per seed).

    python benchmarks/social_morristown.py [--seeds 14]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_social_electorate import measure_morristown  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=14)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {seed: measure_morristown(seed) for seed in range(args.seeds)}
    out = ROOT / "benchmarks" / "results" / "social_morristown.json"
    out.write_text(json.dumps(runs, indent=1))
    print(f"over seeds 0-{args.seeds - 1}: min-max")
    for key in next(iter(runs.values())):
        values = [r[key] for r in runs.values()]
        print(f"  {key:<18} {min(values):.2f} - {max(values):.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
