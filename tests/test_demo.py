"""`plural-diffusion demo --fast`: every stage runs, metrics have the documented keys, the report
is written, reruns reuse the cached stages."""

import json

import pytest

from plural_diffusion import demo
from plural_diffusion.demo import run_demo


def test_fast_demo_end_to_end_then_cached(fast_demo_config, toy_assets, tmp_path, monkeypatch):
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
    # every policy samples as the policies were trained (train_overrides: sampling.steps=10)
    assert {m["sampling"]["steps"] for m in saved["policies"].values()} == {10}
    assert set(saved["policies"]["matched"]["win_rate"]["gold"]) == {"noir", "sunny", "vivid"}
    # toy.yaml selects each taste's expert: the report says from which checkpoint
    experts = saved["policies"]["matched"]["experts_from"]
    assert set(experts) == {"noir", "sunny", "vivid"}
    assert all(c.startswith("epoch-") for c in experts.values())
    assert "experts_from" not in saved["policies"]["mean"]
    # maxmin is the egalitarian lottery over matched's clusters: taste-blind, no training of its own
    maxmin = saved["policies"]["maxmin"]
    assert maxmin["tastes"] == ["none"] and maxmin["lottery"]["of"] == "matched"
    assert sum(maxmin["lottery"]["shares"].values()) == pytest.approx(1.0, abs=1e-3)
    assert len(maxmin["lottery"]["made_for"]) == len(fast_demo_config.eval.seeds)
    assert set(maxmin["lottery"]["made_for"]) <= {"noir", "sunny", "vivid"}
    fitted = json.loads((tmp_path / "demo" / "lottery.json").read_text())
    assert fitted["shares"] == list(maxmin["lottery"]["shares"].values())
    assert not set(fitted["seeds"]) & set(fast_demo_config.eval.seeds)
    # every checkpoint of the matched run is kept: epochs 1 and 2, after the base model (0)
    assert saved["overoptimisation"]["matched"]["epochs"] == [0, 1, 2]
    report = (tmp_path / "demo" / "report.html").read_text()
    assert "Matched vs mean, per cluster" in report and "Over-optimisation" in report
    assert metrics["reward_heads"]["rater"]["sunny"] > metrics["reward_heads"]["mean"]["sunny"]

    def must_not_train(*args, **kwargs):
        raise AssertionError("a rerun trained a cached stage again")

    monkeypatch.setattr(demo, "train_policy", must_not_train)
    monkeypatch.setattr(demo, "train_rewards", must_not_train)
    again = run_demo(fast_demo_config, out_dir=tmp_path / "again")
    # the same seeds give the same images, so the same figures
    assert (
        again["policies"]["matched"]["gold_per_cluster"]
        == metrics["policies"]["matched"]["gold_per_cluster"]
    )


def test_a_maxmin_lottery_without_the_matched_policy_is_a_one_line_error(
    fast_demo_config, tmp_path
):
    import dataclasses

    from reward_models.errors import UserError

    cfg = dataclasses.replace(fast_demo_config, policies=["mean", "maxmin"])
    with pytest.raises(UserError, match="maxmin=lottery draws from the matched policy"):
        run_demo(cfg, out_dir=tmp_path / "demo")
    with pytest.raises(UserError, match="use lottery or trained"):
        run_demo(dataclasses.replace(fast_demo_config, maxmin="best"), out_dir=tmp_path / "demo")
