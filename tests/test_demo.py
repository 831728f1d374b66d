"""`plural-diffusion demo --fast`: every stage runs, metrics have the documented keys, reruns
reuse the cached stages."""

import json
import time

from plural_diffusion.demo import run_demo


def test_fast_demo_end_to_end_then_cached(fast_demo_config, toy_assets, tmp_path):
    metrics = run_demo(fast_demo_config, out_dir=tmp_path / "demo")
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert saved["clusters"]["names"] == ["noir", "sunny", "vivid"]
    assert set(saved["policies"]) == {"base", "mean", "matched", "maxmin"}
    for name, m in saved["policies"].items():
        assert set(m["gold_per_cluster"]) == {"noir", "sunny", "vivid"}, name
        assert m["worst_cluster_gold"] == min(m["gold_per_cluster"].values())
        assert m["vendi"] >= 1.0
    assert len(saved["cross_taste_gold"]) == 3 and len(saved["cross_taste_gold"][0]) == 3
    assert (tmp_path / "demo" / "policies_grid.png").stat().st_size > 1000
    assert metrics["reward_heads"]["rater"]["sunny"] > metrics["reward_heads"]["mean"]["sunny"]

    t0 = time.perf_counter()
    run_demo(fast_demo_config, out_dir=tmp_path / "again")
    rerun = time.perf_counter() - t0
    assert rerun < metrics["seconds"] / 2, (rerun, metrics["seconds"])
