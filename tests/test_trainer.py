"""The RL trainer on the tiny toy base: both methods run, learn, checkpoint, resume, and fail
cleanly on bad input."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from plural_diffusion.backbone import load_pipeline
from plural_diffusion.configs import CONFIGS
from plural_diffusion.ddpo import Trainer, latest_checkpoint, train
from plural_diffusion.policy import TastePolicy
from plural_diffusion.train_config import TrainConfig
from reward_models.config import load_config
from reward_models.errors import UserError


def toy_config(toy_assets, reward_run, tmp_path, *overrides):
    return load_config(
        TrainConfig,
        CONFIGS / "toy.yaml",
        [
            f"base={toy_assets.base}",
            f"rewards={reward_run}",
            f"out_dir={tmp_path / 'run'}",
            "sampling.steps=6",
            "draft.batch_size=6",
            "draft.steps_per_epoch=1",
            "ddpo.sample_batch_size=6",
            "ddpo.sample_batches=1",
            "ddpo.train_batch_size=6",
            "save_every=1",
            *overrides,
        ],
    )


def lora_weights(run_dir):
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    return load_file(str(ckpt / "policy" / "pytorch_lora_weights.safetensors"))


@torch.no_grad()
def fixed_batch(trainer, batch: int, seed: int):
    """The trainer's policy (now) on one fixed batch of prompts, tastes and noise: the
    trajectory, the tastes z and the prompt embeddings; the trainer's generator is untouched."""
    saved, trainer.generator = trainer.generator, torch.Generator().manual_seed(seed)
    _, _, z, traj = trainer._sample_batch(batch)
    trainer.generator = saved
    return traj, z, traj.prompt_embeds, traj.negative_embeds


def reward_on_fixed_batch(trainer, batch=6, seed=99):
    """Mean matched reward of the policy on one fixed batch of prompts, tastes and noise."""
    traj, z, _, _ = fixed_batch(trainer, batch, seed)
    with torch.no_grad():
        return trainer.rewards.reward(traj.images, z, "matched").mean().item()


def test_draft_matched_raises_the_reward_and_saves_a_diffusers_lora(
    toy_assets, reward_run, tmp_path
):
    cfg = toy_config(toy_assets, reward_run, tmp_path, "epochs=5", "lr=0.01", "draft.batch_size=12")
    trainer = Trainer(cfg)
    before = reward_on_fixed_batch(trainer)
    trainer.fit(progress=False)
    after = reward_on_fixed_batch(trainer)
    assert after > before + 0.5, (before, after)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1, 2, 3, 4]
    assert set(log[0]["per_taste"]) == {"noir", "sunny", "vivid"}
    # the checkpoint is a plain diffusers LoRA: it loads with diffusers' own loader
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    pipe = load_pipeline(toy_assets.base)
    pipe.load_lora_weights(ckpt / "policy", weight_name="pytorch_lora_weights.safetensors")
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
    assert (ckpt / "policy" / "taste_conditioner").is_dir()


def test_ddpo_epoch_updates_lora_with_finite_statistics(toy_assets, reward_run, tmp_path):
    cfg = toy_config(toy_assets, reward_run, tmp_path, "method=ddpo", "epochs=1", "lr=0.01")
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if p.requires_grad}
    log = trainer.train_epoch()
    for key in ("loss", "approx_kl", "clipfrac", "reward_mean"):
        assert torch.isfinite(torch.tensor(log[key])), key
    after = dict(trainer.unet.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_resumed_run_matches_an_uninterrupted_one(toy_assets, reward_run, tmp_path):
    straight = toy_config(toy_assets, reward_run, tmp_path / "a", "epochs=2", "objective=mean")
    train(straight, progress=False)
    first = toy_config(toy_assets, reward_run, tmp_path / "b", "epochs=1", "objective=mean")
    train(first, progress=False)
    resumed = toy_config(toy_assets, reward_run, tmp_path / "b", "epochs=2", "objective=mean")
    train(resumed, resume=True, progress=False)
    a, b = lora_weights(tmp_path / "a" / "run"), lora_weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def test_nan_reward_stops_with_the_epoch_named_and_keeps_checkpoints(
    toy_assets, reward_run, tmp_path, monkeypatch
):
    cfg = toy_config(toy_assets, reward_run, tmp_path, "epochs=3", "objective=mean")
    trainer = Trainer(toy_config(toy_assets, reward_run, tmp_path, "epochs=1", "objective=mean"))
    trainer.fit(progress=False)
    saved = latest_checkpoint(tmp_path / "run" / "checkpoints")
    weights = saved / "policy" / "pytorch_lora_weights.safetensors"
    before = weights.read_bytes()
    trainer = Trainer(cfg)
    monkeypatch.setattr(trainer.rewards, "reward", lambda *a, **k: torch.full((6,), float("nan")))
    with pytest.raises(UserError, match="non-finite reward at epoch 1"):
        trainer.fit(resume=True, progress=False)
    assert weights.read_bytes() == before


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["base=/no/such/base"], "base model directory not found"),
        (["mixed_precision=fp16", "device=cpu"], "fp16 needs a CUDA GPU"),
        (["attention=xformers"], "does not compose with taste tokens"),
        (["attention=xformers", "objective=mean"], "xformers is not installed"),
        (["expect_architecture=sd15"], "expect_architecture=sd15 but its text states are 64"),
        (["resolution=20"], "needs a multiple of 8 .its own is 32"),
        (["resolution=16"], "CLIP reads 32 px images but the policy makes 16 px"),
        (["ddpo.gradient_accumulation=0"], "must be >= 1"),
    ],
)
def test_bad_input_is_a_one_line_error(toy_assets, reward_run, tmp_path, overrides, message):
    cfg = toy_config(toy_assets, reward_run, tmp_path, *overrides)
    with pytest.raises(UserError, match=message) as e:
        Trainer(cfg)
    assert "\n" not in str(e.value)


def test_grouped_batches_of_any_size_continue_a_group_in_the_next_batch(
    toy_assets, reward_run, tmp_path
):
    # 5 images over 3 clusters: groups (one prompt, one noise, every taste) are filled
    # round-robin and the group the first batch cuts off is finished by the second
    trainer = Trainer(toy_config(toy_assets, reward_run, tmp_path, "draft.batch_size=5"))
    prompt1, taste1, z1, noise1 = trainer.draw_batch(5)
    prompt2, taste2, z2, noise2 = trainer.draw_batch(5)
    assert taste1.tolist() == [0, 1, 2, 0, 1] and taste2.tolist() == [2, 0, 1, 2, 0]
    assert prompt2[0] == prompt1[3] and torch.equal(noise2[0], noise1[3])  # one group
    assert torch.equal(noise1[0], noise1[2]) and not torch.equal(noise1[0], noise1[3])
    torch.testing.assert_close(z2[0], trainer.tastes[2])
    log = trainer.train_epoch()
    assert torch.isfinite(torch.tensor(log["reward_mean"]))


def kl_on_fixed_batch(trainer, batch=6, seed=7) -> float:
    """KL-to-base of the policy's denoising step, averaged over one fixed batch's trajectory."""
    from plural_diffusion.sampling import guided_noise

    traj, z, embeds, negative = fixed_batch(trainer, batch, seed)
    guidance = trainer.cfg.sampling.guidance_scale
    kls = []
    with torch.no_grad():
        for j, t in enumerate(traj.timesteps[:-1]):
            x_t = traj.latents[:, j]
            pred = guided_noise(
                trainer.unet, trainer.conditioner, x_t, t, embeds, negative, z, guidance
            )
            kls.append(trainer._kl_to_base(pred, x_t, t, embeds, negative).item())
    return sum(kls) / len(kls)


def test_kl_to_base_is_zero_at_start_and_the_penalty_keeps_the_policy_near_the_base(
    toy_assets, reward_run, tmp_path
):
    common = ("method=ddpo", "epochs=3", "lr=0.03", "ddpo.clip_range=0.2")
    free = Trainer(toy_config(toy_assets, reward_run, tmp_path / "free", *common))
    # zero-initialised LoRA and taste module: the policy *is* the base model
    assert kl_on_fixed_batch(free) == 0.0
    free.fit(progress=False)
    penalised = Trainer(
        toy_config(toy_assets, reward_run, tmp_path / "kl", *common, "ddpo.kl_weight=100")
    )
    penalised.fit(progress=False)
    kl_free, kl_penalised = kl_on_fixed_batch(free), kl_on_fixed_batch(penalised)
    assert kl_free > 0
    assert kl_penalised < 0.5 * kl_free, (kl_free, kl_penalised)
    assert "kl_to_base" in penalised.history[-1]


@pytest.fixture(scope="module")
def ensemble_run(fast_demo_config, toy_assets):
    from plural_diffusion.cache import cache_root
    from plural_diffusion.demo import stage_rewards

    cfg = dataclasses.replace(
        fast_demo_config,
        reward_overrides=[*fast_demo_config.reward_overrides, "ensemble_size=2", "train.epochs=20"],
    )
    return stage_rewards(cfg, toy_assets, cache_root())


def test_ensemble_penalty_subtracts_k_times_the_heads_disagreement(ensemble_run):
    from plural_diffusion.rewards import TasteRewards

    rewards = TasteRewards(str(ensemble_run))
    assert len(rewards.members) == 2
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    taste = torch.tensor([0, 1, 2, 0, 1, 2])
    z = rewards.cluster_tastes[taste]
    plain = rewards.reward(images, z, "matched")
    utilities = rewards.ensemble_utilities(rewards.features(images), taste, "clusters")
    assert utilities.shape == (3, 6)  # the run's own head, then its two members
    torch.testing.assert_close(utilities[0], plain)
    std = rewards.ensemble_std(rewards.features(images), taste, "clusters")
    torch.testing.assert_close(std, utilities.std(dim=0))
    assert (std > 0).all()  # bootstrapped heads disagree somewhere on random images
    penalised = rewards.reward(images, z, "matched", penalty=2.0, taste_index=taste)
    torch.testing.assert_close(penalised, plain - 2.0 * std)
    # each member reads the taste in its own space: the same cluster, not the same vector
    member_z = rewards._member_tastes["clusters"][1]
    assert not torch.allclose(member_z, rewards.cluster_tastes)


def test_ensemble_penalty_without_an_ensemble_is_a_one_line_error(toy_assets, reward_run, tmp_path):
    cfg = toy_config(toy_assets, reward_run, tmp_path, "ensemble_penalty=1.0")
    with pytest.raises(UserError, match="retrain .* with ensemble_size=N"):
        Trainer(cfg)


def test_draft_with_the_ensemble_penalty_lowers_the_reward_and_changes_the_update(
    toy_assets, ensemble_run, tmp_path
):
    def one_epoch(penalty: float):
        cfg = toy_config(
            toy_assets,
            ensemble_run,
            tmp_path / str(penalty),
            "epochs=1",
            f"ensemble_penalty={penalty}",
        )
        trainer = Trainer(cfg)
        log = trainer.train_epoch()
        lora = {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if "lora" in n}
        return log, lora

    # the same seed: the same LoRA initialisation and the same first batch of images
    plain, plain_lora = one_epoch(0.0)
    penalised, penalised_lora = one_epoch(1.0)
    assert torch.isfinite(torch.tensor(penalised["reward_mean"]))
    # reward - 1.0 * std over the ensemble, and the heads disagree on every image
    assert penalised["reward_mean"] < plain["reward_mean"] - 1e-3, (plain, penalised)
    assert any(not torch.equal(plain_lora[n], penalised_lora[n]) for n in plain_lora)


def test_mean_blend_shrinks_each_tastes_reward_toward_the_mean_head_by_its_clusters_share(
    reward_run,
):
    from plural_diffusion.rewards import TasteRewards

    rewards = TasteRewards(str(reward_run))
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    taste = torch.tensor([0, 1, 2, 0, 1, 2])
    z = rewards.cluster_tastes[taste]
    own = rewards.reward(images, z, "matched")
    mean = rewards.reward(images, None, "mean")
    s = rewards.cluster_shares[taste]
    assert len(set(s.tolist())) == 3  # three clusters of different sizes
    for w in (1.0, 0.5):
        blended = rewards.reward(images, z, "matched", taste_index=taste, mean_blend=w)
        torch.testing.assert_close(blended, (1 - w * s) * own + w * s * mean)
    # a rater's taste takes the share of the rater's cluster
    raters = torch.arange(6)
    zr = rewards.rater_tastes[raters]
    own_r = rewards.reward(images, zr, "matched")
    s_r = rewards.cluster_shares[rewards.run.clusters.labels[raters]]
    blended_r = rewards.reward(
        images, zr, "matched", taste_index=raters, source="raters", mean_blend=1
    )
    torch.testing.assert_close(blended_r, (1 - s_r) * own_r + s_r * mean)
    with pytest.raises(UserError, match="mean_blend needs the taste index"):
        rewards.reward(images, z, "matched", mean_blend=1.0)


def test_mean_blend_outside_zero_to_one_is_a_one_line_error(toy_assets, reward_run, tmp_path):
    cfg = toy_config(toy_assets, reward_run, tmp_path, "mean_blend=1.5")
    with pytest.raises(UserError, match=r"mean_blend=1.5: a weight in \[0, 1\]"):
        Trainer(cfg)


def test_share_weighting_with_grouped_tastes_is_a_one_line_error(toy_assets, reward_run, tmp_path):
    cfg = toy_config(toy_assets, reward_run, tmp_path, "taste.weighting=share")
    with pytest.raises(UserError, match="set taste.grouped=false to draw tastes by their shares"):
        Trainer(cfg)


def test_the_trainer_rewards_matched_images_with_the_blend(toy_assets, reward_run, tmp_path):
    cfg = toy_config(toy_assets, reward_run, tmp_path, "epochs=1", "mean_blend=1")
    trainer = Trainer(cfg)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    taste = torch.tensor([0, 1, 2])
    z = trainer.rewards.cluster_tastes[taste]
    expected = trainer.rewards.reward(images, z, "matched", taste_index=taste, mean_blend=1.0)
    torch.testing.assert_close(trainer._reward(images, z, taste), expected)
    assert not torch.allclose(expected, trainer.rewards.reward(images, z, "matched"))


@pytest.fixture(scope="module")
def latent_run(fast_demo_config, toy_assets):
    from plural_diffusion.cache import cache_root
    from plural_diffusion.demo import stage_rewards

    overrides = ["latent.enabled=true", "latent.train.steps=150", "train.epochs=20"]
    cfg = dataclasses.replace(
        fast_demo_config, reward_overrides=[*fast_demo_config.reward_overrides, *overrides]
    )
    return stage_rewards(cfg, toy_assets, cache_root())


def test_latent_tastes_are_posterior_draws_around_each_clusters_raters(
    toy_assets, latent_run, tmp_path
):
    cfg = toy_config(toy_assets, latent_run, tmp_path, "taste.source=latents", "epochs=1")
    trainer = Trainer(cfg)
    rewards = trainer.rewards
    assert rewards.space == "latent" and rewards.taste_dim == rewards.run.latent.taste_dim
    _, taste, z, _ = trainer.draw_batch(6)
    assert taste.tolist() == [0, 1, 2, 0, 1, 2]  # grouped: every cluster once per group
    assert not torch.equal(z[0], z[3])  # the same cluster, two different draws
    # each draw lies nearer its own cluster's taste than another cluster's, on average
    dist = torch.cdist(z, rewards.cluster_tastes)  # [6, K]
    own = dist[torch.arange(6), taste].mean()
    assert own < dist.mean(), (own, dist.mean())
    log = trainer.train_epoch()
    assert set(log["per_taste"]) == set(rewards.cluster_names)
    assert all(
        "gold" not in e or torch.isfinite(torch.tensor(e["gold"]))
        for e in log["per_taste"].values()
    )
    trainer.save(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "policy" / "checkpoint.json").read_text())["metadata"]
    assert meta["taste_space"] == "latent"

    # generation asks such a policy for clusters by their latent taste, and turns a new user's
    # ratings into a taste with one pass of the latent encoder
    from plural_diffusion.evaluate import policy_tastes
    from plural_diffusion.generate import resolve_taste
    from plural_diffusion.rewards import TasteRewards

    policy = TastePolicy.from_pretrained(str(toy_assets.base), tmp_path / "ckpt" / "policy")
    in_rater_space = TasteRewards(str(latent_run))
    asked = torch.stack([t.z for t in policy_tastes(policy, in_rater_space)])
    torch.testing.assert_close(asked, rewards.cluster_tastes.cpu())
    scores = (toy_assets.world / "scores.csv").read_text().splitlines()
    rater = scores[1].split(",")[1]
    mine = [line for line in scores[1:] if line.split(",")[1] == rater][:10]
    ratings = tmp_path / "ratings.csv"
    ratings.write_text(
        "image,score\n"
        + "".join(
            f"{toy_assets.world / line.split(',')[0]},{line.split(',')[2]}\n" for line in mine
        )
    )
    user = resolve_taste(f"ratings:{ratings}", rewards)
    assert user.z.shape == (rewards.taste_dim,) and torch.isfinite(user.z).all()
    assert user.z.abs().sum() > 0  # moved off the prior mean


def test_latent_source_without_a_latent_head_is_a_one_line_error(toy_assets, reward_run, tmp_path):
    cfg = toy_config(toy_assets, reward_run, tmp_path, "taste.source=latents")
    with pytest.raises(UserError, match="latent.enabled=true"):
        Trainer(cfg)


def test_a_social_head_replaces_the_mean_head_of_the_mean_objective(
    toy_assets, reward_run, tmp_path
):
    import shutil

    from reward_models.cli import main as reward_models_main

    candidates = tmp_path / "candidates"
    candidates.mkdir()
    for image in sorted((toy_assets.world / "images").glob("*.png"))[:8]:
        shutil.copy(image, candidates / image.name)
    social = tmp_path / "social"
    argv = [
        "social",
        "--heads",
        str(reward_run),
        "--rule",
        "borda",
        "--candidates",
        str(candidates),
        "--out",
        str(social),
        "--voters",
        "60",
    ]
    with pytest.raises(SystemExit) as done:
        reward_models_main(argv)
    assert done.value.code == 0
    cfg = toy_config(
        toy_assets, reward_run, tmp_path, "objective=mean", f"mean_head={social / 'head'}"
    )
    trainer = Trainer(cfg)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = trainer.rewards.features(images)
    expected = trainer.rewards.mean_head.score(features, None)
    torch.testing.assert_close(trainer.rewards.reward(images, None, "mean"), expected)
    assert not torch.allclose(expected, trainer.rewards.run.mean.score(features, None))
    log = trainer.train_epoch()
    assert torch.isfinite(torch.tensor(log["reward_mean"]))


def test_lora_experts_give_each_cluster_its_own_block_and_reload_for_generation(
    toy_assets, reward_run, tmp_path
):
    from plural_diffusion.evaluate import EvalConfig, generate_per_taste

    cfg = toy_config(toy_assets, reward_run, tmp_path, "lora.experts=true", "epochs=2", "lr=0.01")
    trainer = Trainer(cfg)
    assert trainer.conditioner.config.experts == 3
    trainer.fit(progress=False)
    weights = lora_weights(tmp_path / "run")
    a = next(v for k, v in weights.items() if "lora_A" in k or "lora.down" in k)
    assert a.shape[0] == 3 * cfg.lora.rank  # three experts of rank r, none shared
    # a cluster's own taste routes (almost) all of its own update to its own expert
    gates = trainer.conditioner.gates(trainer.rewards.cluster_tastes, 3)
    assert gates.shape == (3, 3) and (gates.diagonal() > 0.9).all(), gates
    # the saved policy generates through the same routing as the trainer
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    policy = TastePolicy.from_pretrained(str(toy_assets.base), ckpt / "policy")
    settings = policy.settings()
    assert settings.sampling.steps == 6  # as trained
    images = generate_per_taste(policy, trainer.rewards, EvalConfig(images_per_prompt=2), settings)
    assert set(images) == {"noir", "sunny", "vivid"}
    assert (images["noir"] - images["sunny"]).abs().max() > 0.01


@pytest.mark.parametrize("method", ["draft", "ddpo"])
def test_each_taste_cluster_has_its_own_expert_and_taste_module_and_nothing_is_shared(
    toy_assets, reward_run, tmp_path, method
):
    # with LoRA experts, either method: three blocks (no shared fourth) and a taste module per
    # cluster, reading its taste relative to its centroid; the shared layout stays an option
    cfg = toy_config(toy_assets, reward_run, tmp_path, f"method={method}")
    assert cfg.lora.experts and cfg.lora.shared_expert is False
    assert cfg.conditioning.expert_tokens is None
    trainer = Trainer(cfg)
    a = next(p for n, p in trainer.unet.named_parameters() if "lora_A" in n)
    assert a.shape[0] == 3 * cfg.lora.rank
    config = trainer.conditioner.config
    assert not config.shared_expert and config.expert_tokens and config.centred_experts
    assert len(trainer.conditioner.expert_modules) == 2  # clusters 1 and 2; 0 is the base MLP
    shared = toy_config(
        toy_assets,
        reward_run,
        tmp_path / "shared",
        f"method={method}",
        "lora.shared_expert=true",
        "conditioning.expert_tokens=false",
    )
    trainer = Trainer(shared)
    a = next(p for n, p in trainer.unet.named_parameters() if "lora_A" in n)
    assert a.shape[0] == 4 * cfg.lora.rank
    assert not hasattr(trainer.conditioner, "expert_modules")


def test_a_checkpoint_resumes_only_into_the_expert_layout_it_was_trained_with(
    toy_assets, reward_run, tmp_path
):
    cfg = toy_config(toy_assets, reward_run, tmp_path, "epochs=1", "select_experts=false")
    Trainer(cfg).fit(progress=False)
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    other = toy_config(
        toy_assets,
        reward_run,
        tmp_path,
        "epochs=2",
        "lora.shared_expert=true",
        "select_experts=false",
    )
    with pytest.raises(UserError, match="trained with lora.shared_expert=false; resume it with"):
        Trainer(other).resume(ckpt)


@pytest.mark.parametrize("objective", ["mean", "maxmin"])
def test_lora_experts_leave_the_taste_blind_objectives_one_lora(
    toy_assets, reward_run, tmp_path, objective
):
    cfg = toy_config(
        toy_assets, reward_run, tmp_path, "lora.experts=true", f"objective={objective}"
    )
    trainer = Trainer(cfg)  # one config trains every policy of the demo
    a = next(p for n, p in trainer.unet.named_parameters() if "lora_A" in n)
    assert a.shape[0] == cfg.lora.rank


def test_maxmin_scores_clusters_on_the_base_models_scale_in_shares_by_need(
    toy_assets, reward_run, tmp_path
):
    trainer = Trainer(toy_config(toy_assets, reward_run, tmp_path, "objective=maxmin"))
    rewards = trainer.rewards
    assert rewards.cluster_loc is not None and (rewards.cluster_scale > 0).all()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reward = trainer._reward(images, None, None)
    raw = rewards.cluster_scores(rewards.features(images))
    standardised = (raw - rewards.cluster_loc) / rewards.cluster_scale  # [6, K]
    assignment = trainer.maxmin.assign(standardised)
    shares = trainer.maxmin.shares()  # from the running estimates, this batch included
    torch.testing.assert_close(assignment.sum(dim=0), 6 * shares, rtol=0, atol=0.05)
    expected = (standardised * assignment).sum(dim=1)
    torch.testing.assert_close(reward, expected, rtol=1e-4, atol=1e-4)


def test_draft_kl_penalty_is_zero_for_the_fresh_adapter_and_logged(
    toy_assets, reward_run, tmp_path
):
    trainer = Trainer(
        toy_config(toy_assets, reward_run, tmp_path, "draft.kl_weight=10", "epochs=1")
    )
    log = trainer.train_epoch()
    # the first batch is sampled by the zero-initialised LoRA: the policy is the base model
    assert log["kl_to_base"] == pytest.approx(0.0, abs=1e-10)
    log = trainer.train_epoch()
    assert log["kl_to_base"] > 0
