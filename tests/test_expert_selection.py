"""Per-taste expert selection: each taste cluster keeps its LoRA expert from the checkpoint where
its own head scores its held-out images highest, beside the last epoch's shared block."""

import json
import shutil

import pytest
import torch

from plural_diffusion.backbone import read_lora_state
from plural_diffusion.ddpo import Trainer, final_checkpoint, latest_checkpoint
from plural_diffusion.expert_selection import pick_best, with_expert_block
from reward_models.errors import UserError
from tests.test_trainer import toy_config


def _state(value: float, rank: int = 2, experts: int = 3) -> dict[str, torch.Tensor]:
    return {
        "down.lora_A.weight": torch.full((experts * rank, 5), value),
        "down.lora_B.weight": torch.full((7, experts * rank), value),
    }


def test_an_expert_block_is_its_rows_of_a_and_its_columns_of_b():
    current, source = _state(0.0), _state(1.0)
    out = with_expert_block(current, source, expert=1, rank=2)
    a, b = out["down.lora_A.weight"], out["down.lora_B.weight"]
    assert (a[2:4] == 1).all() and (a[:2] == 0).all() and (a[4:] == 0).all()
    assert (b[:, 2:4] == 1).all() and (b[:, :2] == 0).all() and (b[:, 4:] == 0).all()
    assert (current["down.lora_A.weight"] == 0).all()  # the input is not modified
    with pytest.raises(ValueError, match="shapes"):
        with_expert_block(current, _state(1.0, rank=3), expert=0, rank=2)


def test_a_checkpoint_replaces_the_last_only_by_a_share_of_the_tastes_gain():
    scores = {"epoch-0004": 8.4, "epoch-0008": 8.0, "epoch-0012": 7.9}
    # the last epoch gained 5.9 over the base's 2.0: 5% of it is 0.295, and 8.4 clears 8.195
    assert pick_best(scores, keep="epoch-0012", base=2.0, min_gain=0.05) == "epoch-0004"
    # within the margin the last epoch stays, as it does on a tie
    assert pick_best(scores, keep="epoch-0012", base=2.0, min_gain=0.1) == "epoch-0012"
    tie = {"epoch-0004": 2.0, "epoch-0008": 2.0}
    assert pick_best(tie, keep="epoch-0008", base=1.0, min_gain=0.0) == "epoch-0008"
    # a taste that ended below the base model takes any better checkpoint
    assert pick_best({"a": 1.5, "b": 1.0}, keep="b", base=3.0, min_gain=0.05) == "a"


def test_each_taste_keeps_its_expert_from_its_best_checkpoint_and_the_shared_block_is_the_last(
    toy_assets, reward_run, tmp_path
):
    cfg = toy_config(
        toy_assets,
        reward_run,
        tmp_path,
        "lora.experts=true",
        "epochs=3",
        "lr=0.02",
        "select_experts=true",
        "select_images=4",
        "select_min_gain=0",
    )
    trainer = Trainer(cfg)
    trainer.fit(progress=False)
    root = tmp_path / "run" / "checkpoints"
    selected = final_checkpoint(root)
    assert selected == root / "selected" and latest_checkpoint(root).name == "epoch-0003"
    selection = json.loads((selected / "selection.json").read_text())
    assert selection == json.loads((tmp_path / "run" / "selection.json").read_text())
    assert set(selection) == set(trainer.taste_names)
    rank = cfg.lora.rank
    chosen = read_lora_state(selected / "policy")
    last = read_lora_state(root / "epoch-0003" / "policy")
    for k, name in enumerate(trainer.taste_names):
        scores = selection[name]["held_out_reward"]
        assert set(scores) == {"epoch-0001", "epoch-0002", "epoch-0003"}
        best, last_score = selection[name]["checkpoint"], scores["epoch-0003"]
        margin = 0.05 * max(last_score - selection[name]["base"], 0.0)
        assert best == "epoch-0003" or scores[best] > last_score + margin
        assert best == max(scores, key=scores.get) or best == "epoch-0003"
        source = read_lora_state(root / best / "policy")
        rows = slice(k * rank, (k + 1) * rank)
        for key, value in chosen.items():
            block = value[rows] if ".lora_A." in key else value[:, rows]
            want = source[key][rows] if ".lora_A." in key else source[key][:, rows]
            torch.testing.assert_close(block, want)
    # the shared block (the last one) and the taste module are the last epoch's
    shared = slice(3 * rank, 4 * rank)
    for key, value in chosen.items():
        block = value[shared] if ".lora_A." in key else value[:, shared]
        want = last[key][shared] if ".lora_A." in key else last[key][:, shared]
        torch.testing.assert_close(block, want)
    # the held-out reward is the taste's own head on fixed draws: the same on a second call
    assert trainer.held_out_reward(0) == trainer.held_out_reward(0)
    # a selection older than the newest checkpoint (training extended without selecting) is stale
    later = root / "epoch-0004"
    shutil.copytree(root / "epoch-0003", later)
    state = json.loads((later / "trainer_state.json").read_text())
    (later / "trainer_state.json").write_text(json.dumps({**state, "epoch": 4}))
    assert final_checkpoint(root) == later


def test_select_experts_without_experts_is_a_one_line_error(toy_assets, reward_run, tmp_path):
    cfg = toy_config(toy_assets, reward_run, tmp_path, "select_experts=true", "lora.experts=false")
    with pytest.raises(UserError, match="select_experts=true .* needs lora.experts=true"):
        Trainer(cfg)
    # taste-blind objectives have no experts and ignore it (one config trains every policy)
    blind = toy_config(
        toy_assets, reward_run, tmp_path / "mean", "select_experts=true", "objective=mean"
    )
    Trainer(blind)


def test_the_train_command_says_where_each_tastes_expert_came_from(
    toy_assets, reward_run, tmp_path, capsys
):
    from plural_diffusion.cli import main as pd_main

    run = tmp_path / "run"
    argv = [
        "train",
        f"base={toy_assets.base}",
        f"rewards={reward_run}",
        f"out_dir={run}",
        "sampling.steps=4",
        "draft.batch_size=6",
        "draft.steps_per_epoch=1",
        "save_every=1",
        "epochs=2",
        "select_images=2",
        "tensorboard=false",
    ]
    with pytest.raises(SystemExit) as done:
        pd_main(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "each taste's expert from:" in out and "vivid epoch-000" in out, out
    assert f"the policy: {run / 'checkpoints' / 'selected'}" in out
    assert (run / "checkpoints" / "selected" / "policy" / "checkpoint.json").is_file()
