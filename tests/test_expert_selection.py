"""Per-taste expert selection: each taste cluster keeps its LoRA expert from the checkpoint where
its own head scores its held-out images highest, beside the last epoch's shared block; and
expert restarts: a taste whose own images lag another taste's on its own head takes that
taste's expert."""

import json
import shutil

import numpy as np
import pytest
import torch

from plural_diffusion.backbone import TASTE_DIR, lora_state, read_lora_state
from plural_diffusion.conditioning import load_taste_conditioner
from plural_diffusion.ddpo import Trainer, final_checkpoint, latest_checkpoint
from plural_diffusion.expert_selection import (
    copy_expert_block,
    lagging_experts,
    pick_best,
    pick_varied,
    with_expert_block,
)
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


def test_a_taste_gives_up_a_share_of_its_best_gain_for_looks_and_no_more():
    scores = {"epoch-0004": 7.4, "epoch-0008": 7.8, "epoch-0012": 8.0}  # base 2.0: gain 6.0
    vendi = {"epoch-0004": 2.6, "epoch-0008": 1.9, "epoch-0012": 1.1}
    pick = dict(keep="epoch-0012", base=2.0, min_gain=0.05)
    assert pick_varied(scores, vendi, **pick, looks=0.0) == "epoch-0012"  # pick_best's choice
    # 5% of the best gain is 0.3: epoch 8 (0.2 below) is near enough, epoch 4 (0.6) is not
    assert pick_varied(scores, vendi, **pick, looks=0.05) == "epoch-0008"
    assert pick_varied(scores, vendi, **pick, looks=0.1) == "epoch-0004"
    # measured from the best candidate, not from the last epoch's: a checkpoint that beats
    # the last one by the selection's margin sets the bar
    ahead = {**scores, "epoch-0016": 7.0, "epoch-0012": 8.0}
    assert (
        pick_varied(
            ahead, {**vendi, "epoch-0016": 3.0}, **{**pick, "keep": "epoch-0016"}, looks=0.05
        )
        == "epoch-0008"
    )
    # equally varied: pick_best's choice stays
    same = dict.fromkeys(scores, 1.5)
    assert pick_varied(scores, same, **pick, looks=0.1) == "epoch-0012"
    # a few hundredths of a look are no looks: no reward is given up for them
    alike = {"epoch-0004": 1.04, "epoch-0008": 1.08, "epoch-0012": 1.01}
    assert pick_varied(scores, alike, **pick, looks=0.1) == "epoch-0012"
    # of the candidates about as varied as the most varied, the highest-scoring
    two = {"epoch-0004": 2.6, "epoch-0008": 2.55, "epoch-0012": 1.1}
    assert pick_varied(scores, two, **pick, looks=0.1) == "epoch-0008"


def test_each_taste_keeps_its_expert_from_its_best_checkpoint_and_the_shared_block_is_the_last(
    toy_assets, reward_run, tmp_path
):
    cfg = toy_config(
        toy_assets,
        reward_run,
        tmp_path,
        "lora.experts=true",
        "lora.shared_expert=true",  # the shared layout (DRaFT's default before 2026-11-29)
        "conditioning.expert_tokens=false",
        "epochs=3",
        "lr=0.02",
        "select_experts=true",
        "select_images=4",
        "select_min_gain=0",
        "select_looks=0.5",
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
        # and how many looks each candidate's 4 held-out images hold (Vendi: 1 to 4)
        vendi = selection[name]["held_out_vendi"]
        assert set(vendi) == set(scores) and all(1 - 1e-6 <= v <= 4 + 1e-6 for v in vendi.values())
        # the most varied candidate within half the best gain, else the best (by no margin)
        best, base = selection[name]["checkpoint"], selection[name]["base"]
        assert best == pick_varied(scores, vendi, "epoch-0003", base, min_gain=0, looks=0.5)
        top = max(scores.values())
        assert scores[best] >= top - 0.5 * max(top - base, 0)
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


def expert_tokens_config(toy_assets, reward_run, tmp_path, *overrides):
    """DDPO with LoRA experts and each taste cluster its own taste module, no selection."""
    return toy_config(
        toy_assets,
        reward_run,
        tmp_path,
        "method=ddpo",
        "lora.experts=true",
        "conditioning.expert_tokens=true",
        "select_experts=false",
        *overrides,
    )


def test_with_expert_tokens_a_taste_takes_its_module_from_the_checkpoint_of_its_block(
    toy_assets, reward_run, tmp_path, monkeypatch
):
    """A block is scored beside the module it was trained with, and selected with it."""
    cfg = expert_tokens_config(toy_assets, reward_run, tmp_path, "epochs=3", "select_min_gain=0")
    trainer = Trainer(cfg)
    trainer.fit(progress=False)
    root, rank = tmp_path / "run" / "checkpoints", cfg.lora.rank
    epochs = ["epoch-0001", "epoch-0002", "epoch-0003"]

    def block(state, k):
        rows = slice(k * rank, (k + 1) * rank)
        return [v[rows] if ".lora_A." in n else v[:, rows] for n, v in sorted(state.items())]

    def module(conditioner, k):
        return list(conditioner.expert_module(k).state_dict().values())

    saved = {  # each epoch's (LoRA state, conditioner)
        e: (
            read_lora_state(root / e / "policy"),
            load_taste_conditioner(root / e / "policy" / TASTE_DIR),
        )
        for e in epochs
    }

    def epoch_of(tensors, k, part):
        same = [e for e in epochs if all(map(torch.equal, tensors, part(saved[e], k)))]
        assert len(same) == 1  # every epoch moved every taste's block and module
        return same[0]

    best = {0: "epoch-0001", 1: "epoch-0002", 2: "epoch-0003"}
    seen = []

    def held_out_reward(k, images=None, features=None):
        b = epoch_of(block(lora_state(trainer.unet), k), k, lambda s, k: block(s[0], k))
        m = epoch_of(module(trainer.conditioner, k), k, lambda s, k: module(s[1], k))
        seen.append((k, b, m))
        return 1.0 if b == best[k] else 0.0

    monkeypatch.setattr(trainer, "held_out_reward", held_out_reward)
    monkeypatch.setattr(trainer, "held_out_base_reward", lambda k: 0.0)
    selection = trainer.select_experts(root, progress=False)
    assert len(seen) == 9 and all(b == m for _, b, m in seen)
    assert {n: selection[n]["checkpoint"] for n in trainer.taste_names} == {
        n: best[k] for k, n in enumerate(trainer.taste_names)
    }
    chosen = load_taste_conditioner(root / "selected" / "policy" / TASTE_DIR)
    lora = read_lora_state(root / "selected" / "policy")
    for k in range(3):
        assert all(map(torch.equal, module(chosen, k), module(saved[best[k]][1], k)))
        assert all(map(torch.equal, block(lora, k), block(saved[best[k]][0], k)))
    # the trainer holds the selected policy afterwards
    assert all(map(torch.equal, module(trainer.conditioner, 0), module(chosen, 0)))


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


def test_a_taste_restarts_from_the_expert_whose_images_its_own_head_prefers():
    # rows: made for; columns: scored by. Seed 5's epoch-1 matrix (noir, sunny, vivid):
    # vivid's own images gain 0.45 on its head, sunny's 3.34
    scores = [[5.47, 2.04, 1.94], [2.3, 6.11, 4.98], [4.48, 2.53, 2.09]]
    base = [4.15, 2.79, 1.64]
    assert lagging_experts(scores, base, ratio=0.5) == {2: 1}
    # a gain of more than ratio x the best other's keeps the expert
    assert lagging_experts(scores, base, ratio=0.1) == {}
    # nothing restarts toward images that do not gain over the base's
    flat = [[1.0, 0.0], [0.5, 1.0]]
    assert lagging_experts(flat, [2.0, 2.0], ratio=1.0) == {}
    assert lagging_experts([[3.0]], [1.0], ratio=1.0) == {}  # one taste: no other expert
    # sunny's images lead vivid's own by 2.89: a restart only where that is min_gap x spread
    spread = [1.98, 2.65, 2.52]
    assert lagging_experts(scores, base, 0.5, spread, min_gap=1.0) == {2: 1}
    assert lagging_experts(scores, base, 0.5, spread, min_gap=1.2) == {}


def test_a_restart_copies_the_block_in_a_and_b_and_two_tastes_can_swap():
    a = torch.arange(6.0).repeat_interleave(2).view(6, 2)  # rank 2: blocks rows 0-1, 2-3, 4-5
    b = a.t().clone()
    copy_expert_block([("A", a), ("B", b)], {0: 1, 1: 0}, rank=2)
    assert a[:2].tolist() == [[2, 2], [3, 3]] and a[2:4].tolist() == [[0, 0], [1, 1]]
    assert a[4:].tolist() == [[4, 4], [5, 5]]
    torch.testing.assert_close(b, a.t())


def rig_held_out_rewards(trainer, monkeypatch) -> None:
    """Held-out rewards without sampling: taste 0's head prefers taste 2's images (3.0 against
    its own 1.0), every other head its own taste's: taste 0 restarts from expert 2."""
    rigged = {0: [1.0, 0.0, 0.0], 1: [0.0, 1.0, 0.0], 2: [3.0, 0.0, 1.0]}

    def held_out_reward(taste, images=None):
        return rigged[taste if images is None else images.made_for][taste]

    def held_out_images(taste):
        images = torch.zeros(1)
        images.made_for = 0 if taste is None else taste
        return images

    monkeypatch.setattr(trainer, "held_out_images", held_out_images)
    monkeypatch.setattr(trainer, "held_out_reward", held_out_reward)
    monkeypatch.setattr(trainer, "held_out_scores", lambda taste: (held_out_reward(taste), 1.0))


def test_a_stuck_expert_restarts_from_another_with_its_adam_moments(
    toy_assets, reward_run, tmp_path, monkeypatch, capsys
):
    cfg = toy_config(
        toy_assets,
        reward_run,
        tmp_path,
        "lora.experts=true",
        "epochs=2",
        "restart_experts=true",
        "restart_every=1",
        "restart_until=0.5",
        "restart_min_gap=0",
        "select_experts=true",
        "save_every=1",
        "select_images=2",
    )
    trainer = Trainer(cfg)
    # taste 0's head prefers taste 2's images: it restarts from expert 2 after epoch 1 only
    names = trainer.taste_names
    rig_held_out_rewards(trainer, monkeypatch)
    history = trainer.fit(progress=False)
    assert history[0]["restart"]["restarted"] == {names[0]: names[2]}
    assert "restart" not in history[1]  # restart_until=0.5 of 2 epochs: after epoch 1 only
    assert (
        f"{names[0]}'s expert restarted from {names[2]}'s after epoch 1" in capsys.readouterr().out
    )
    # each head's scale: its std over the reward run's rated images
    assert len(trainer.head_spread) == 3 and min(trainer.head_spread) > 0
    # taste 0's expert in epoch-0001 (saved after the restart) is another's: no candidate
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert set(selection[names[0]]["held_out_reward"]) == {"epoch-0002"}
    assert set(selection[names[1]]["held_out_reward"]) == {"epoch-0001", "epoch-0002"}
    rank = cfg.lora.rank
    state = trainer.optimizer.optimizer.state
    lora = [(n, p) for n, p in trainer.unet.named_parameters() if ".lora_A." in n]
    assert lora
    # since then both blocks trained on their own gradients; a restart now copies again
    before = {n: p.detach().clone() for n, p in lora}
    trainer.restart_experts()
    for name, param in lora:
        torch.testing.assert_close(param[:rank], param[2 * rank : 3 * rank])
        torch.testing.assert_close(param[rank : 2 * rank], before[name][rank : 2 * rank])
        moments = state[param]
        torch.testing.assert_close(
            moments["exp_avg"][:rank], moments["exp_avg"][2 * rank : 3 * rank]
        )
        torch.testing.assert_close(
            moments["exp_avg_sq"][:rank], moments["exp_avg_sq"][2 * rank : 3 * rank]
        )


def test_under_ddpo_a_restarted_taste_forgets_its_reward_history(
    toy_assets, reward_run, tmp_path, monkeypatch
):
    """DDPO centres each reward on its (prompt, taste) key's history; a restarted taste's
    history is another expert's past, so it is dropped (keys and group), the others' kept."""
    cfg = toy_config(
        toy_assets,
        reward_run,
        tmp_path,
        "method=ddpo",
        "lora.experts=true",
        "restart_experts=true",
        "restart_min_gap=0",
    )
    trainer = Trainer(cfg)
    n_tastes, n_prompts = len(trainer.taste_names), len(cfg.prompts)
    prompts, groups = np.divmod(np.arange(n_prompts * n_tastes), n_tastes)
    keys = trainer.reward_keys(prompts, groups)
    trainer.tracker.observe(keys, np.arange(len(keys), dtype=float), groups)
    rig_held_out_rewards(trainer, monkeypatch)
    assert trainer.restart_experts()["restarted"] == {
        trainer.taste_names[0]: trainer.taste_names[2]
    }
    kept = {int(k) for k, g in zip(keys, groups) if g != 0}
    assert set(trainer.tracker.history) == kept
    assert set(trainer.tracker.group_history) == set(range(1, n_tastes))


def test_with_expert_tokens_a_restart_copies_the_taste_module_too(
    toy_assets, reward_run, tmp_path, monkeypatch
):
    cfg = expert_tokens_config(
        toy_assets,
        reward_run,
        tmp_path,
        "epochs=1",
        "restart_experts=true",
        "restart_every=1",
        "restart_min_gap=0",
    )
    trainer = Trainer(cfg)
    trainer.fit(progress=False)  # one epoch: every module and its Adam moments have moved
    rig_held_out_rewards(trainer, monkeypatch)
    modules = [trainer.conditioner.expert_module(k) for k in range(3)]
    before = [[p.detach().clone() for p in m.parameters()] for m in modules]
    assert any(not torch.equal(a, b) for a, b in zip(before[0], before[2]))
    assert trainer.restart_experts()["restarted"] == {
        trainer.taste_names[0]: trainer.taste_names[2]
    }
    state = trainer.optimizer.optimizer.state
    for p0, p1, p2, old1 in zip(*(m.parameters() for m in modules), before[1]):
        torch.testing.assert_close(p0, p2)
        torch.testing.assert_close(p1, old1)
        if p2 in state:
            torch.testing.assert_close(state[p0]["exp_avg"], state[p2]["exp_avg"])


def test_restart_experts_without_experts_is_a_one_line_error(toy_assets, reward_run, tmp_path):
    cfg = toy_config(
        toy_assets,
        reward_run,
        tmp_path,
        "restart_experts=true",
        "lora.experts=false",
        "select_experts=false",
    )
    with pytest.raises(UserError, match="restart_experts=true .* needs lora.experts=true"):
        Trainer(cfg)
    with pytest.raises(UserError, match="restart_ratio=0"):
        Trainer(toy_config(toy_assets, reward_run, tmp_path / "r", "restart_ratio=0"))


def test_restart_experts_without_the_rated_images_is_a_one_line_error(
    toy_assets, reward_run, tmp_path
):
    # a reward run moved away from its ratings: each head's spread cannot be measured
    moved = tmp_path / "rewards" / "run"
    shutil.copytree(reward_run, moved)
    config = json.loads((moved / "config.json").read_text())
    config["data"]["path"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    cfg = toy_config(toy_assets, moved, tmp_path, "restart_experts=true", "lora.experts=true")
    with pytest.raises(UserError, match="restart_experts=true scales each head .* did not load"):
        Trainer(cfg)
