"""Trainer options that matter at Stable Diffusion scale, shown on the toy base: fp16 loss
scaling, gradient accumulation, rewards in float32, decoder checkpointing, taste dropout and
a checkpoint that loads without unpickling."""

import dataclasses
import warnings

import pytest
import torch
from test_trainer import toy_config

from plural_diffusion.ddpo import Trainer, latest_checkpoint
from plural_diffusion.policy import CheckpointInfo, SamplingOverrides, resolve_settings
from plural_diffusion.sampling import decode_images
from reward_models.errors import UserError


def simulate_fp16_loss_scaling(trainer, monkeypatch, scale=2.0**16):
    """accelerate's fp16 loss scaling (a GradScaler, a scaler-aware optimizer) on the CPU,
    where accelerate refuses fp16; the arithmetic stays float32 (autocast off), so only the
    scaling differs: `accelerator.backward` multiplies the loss by `scale`, and the gradients
    must be unscaled before they are clipped."""
    import contextlib

    from accelerate.optimizer import AcceleratedOptimizer

    acc = trainer.accelerator
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    monkeypatch.setattr(acc, "scaler", scaler)
    monkeypatch.setattr(acc, "native_amp", True)
    monkeypatch.setattr(type(acc), "mixed_precision", property(lambda self: "fp16"))
    monkeypatch.setattr(acc, "autocast", contextlib.nullcontext)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    trainer.optimizer = AcceleratedOptimizer(inner, scaler=scaler)
    acc._optimizers = [trainer.optimizer]
    return scaler


def lora_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if p.requires_grad}


def test_fp16_gradients_are_unscaled_before_clipping_and_an_overflow_skips_the_step(
    toy_assets, reward_run, tmp_path, monkeypatch
):
    args = (toy_assets, reward_run, tmp_path, "epochs=1", "lr=0.01", "objective=mean")
    plain = Trainer(toy_config(*args))
    plain.train_epoch()
    scaled = Trainer(toy_config(*args))
    scaler = simulate_fp16_loss_scaling(scaled, monkeypatch)
    scaled.train_epoch()
    # unscaled before clipping: the same update as without loss scaling (clipping the
    # 65536x gradients to norm 1 would shrink the step)
    for name, value in lora_state(plain).items():
        torch.testing.assert_close(lora_state(scaled)[name], value, rtol=1e-5, atol=1e-7)

    # an overflow: the step is skipped and the scale lowered; the run goes on
    before = lora_state(scaled)
    param = next(p for p in scaled.params if p.requires_grad)
    hook = param.register_hook(lambda g: torch.full_like(g, float("inf")))
    log = scaled.train_epoch()
    hook.remove()
    assert log["skipped_steps"] == 1 and scaler.get_scale() == 2.0**15
    assert all(torch.equal(before[n], v) for n, v in lora_state(scaled).items())
    assert scaled.train_epoch()["skipped_steps"] == 0


def ddpo_args(toy_assets, reward_run, tmp_path, *extra):
    return toy_config(
        toy_assets,
        reward_run,
        tmp_path,
        "method=ddpo",
        "epochs=1",
        "sampling.steps=4",
        "ddpo.inner_epochs=1",
        "ddpo.timestep_fraction=1.0",
        *extra,
    )


def gradients_at_each_step(trainer, monkeypatch):
    seen = []
    step = trainer._optimizer_step

    def record():
        seen.append([p.grad.clone() for p in trainer.params if p.grad is not None])
        step()

    monkeypatch.setattr(trainer, "_optimizer_step", record)
    trainer.train_epoch()
    return seen


def test_gradient_accumulation_of_two_minibatches_takes_the_step_of_one_twice_as_large(
    toy_assets, reward_run, tmp_path, monkeypatch
):
    whole = Trainer(ddpo_args(toy_assets, reward_run, tmp_path, "ddpo.train_batch_size=6"))
    halves = Trainer(
        ddpo_args(
            toy_assets,
            reward_run,
            tmp_path,
            "ddpo.train_batch_size=3",
            "ddpo.gradient_accumulation=2",
        )
    )
    one = gradients_at_each_step(whole, monkeypatch)
    two = gradients_at_each_step(halves, monkeypatch)
    assert len(one) == len(two) == 1  # one optimizer step per epoch either way
    for a, b in zip(one[0], two[0]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-8)
    # without accumulation, a step per minibatch (the toy default)
    each = Trainer(ddpo_args(toy_assets, reward_run, tmp_path, "ddpo.train_batch_size=3"))
    assert each.cfg.ddpo.gradient_accumulation == 1
    assert len(gradients_at_each_step(each, monkeypatch)) == 2


def test_rewards_are_scored_in_float32_under_bf16_autocast_and_stay_differentiable(
    toy_assets, reward_run, tmp_path
):
    trainer = Trainer(toy_config(toy_assets, reward_run, tmp_path))
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    taste = torch.tensor([0, 1, 2, 0, 1, 2])
    z = trainer.tastes[taste]
    fp32 = trainer.rewards.reward(images, z, "matched")
    images.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = trainer._reward(images, z, taste)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, fp32, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = trainer.rewards.reward(images, z, "matched")  # what autocast used to give
    assert (in_bf16 - fp32).abs().max() > 100 * (under_autocast - fp32).abs().max()
    under_autocast.sum().backward()  # DRaFT's path: reward -> images
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_draft_checkpoints_the_decoder_with_the_same_gradient_and_fewer_saved_activations(
    toy_assets, reward_run, tmp_path
):
    trainer = Trainer(toy_config(toy_assets, reward_run, tmp_path, "draft.checkpoint_decoder=true"))
    vae = trainer.pipe.vae
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def decode_and_backward():
        x = latents.clone().requires_grad_(True)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            images = decode_images(vae, x)
        images.square().sum().backward()
        return sum(saved), x.grad

    checkpointed_bytes, checkpointed_grad = decode_and_backward()
    vae.disable_gradient_checkpointing()
    plain_bytes, plain_grad = decode_and_backward()
    assert checkpointed_bytes < 0.5 * plain_bytes, (checkpointed_bytes, plain_bytes)
    torch.testing.assert_close(checkpointed_grad, plain_grad)
    assert trainer.train_epoch()["loss"] is not None  # the trainer's DRaFT step runs with it


@pytest.mark.parametrize("method", ["draft", "ddpo"])
def test_taste_dropout_asks_the_policy_for_the_null_taste_scored_for_the_drawn_taste(
    toy_assets, reward_run, tmp_path, monkeypatch, method
):
    cfg = toy_config(
        toy_assets,
        reward_run,
        tmp_path,
        "conditioning.taste_dropout=0.5",
        f"method={method}",
        "draft.batch_size=12",
        "ddpo.sample_batch_size=12",
        "ddpo.train_batch_size=6",
        "sampling.steps=4",
    )
    trainer = Trainer(cfg)
    asked, scored = [], []
    sample, reward = trainer.policy.sample, trainer._reward
    monkeypatch.setattr(
        trainer.policy, "sample", lambda **k: asked.append(k["tastes"]) or sample(**k)
    )
    monkeypatch.setattr(trainer, "_reward", lambda im, z, t: scored.append(z) or reward(im, z, t))
    null_before = trainer.conditioner.null.detach().clone()
    trainer.train_epoch()
    null = null_before.expand_as(asked[0])
    dropped = (asked[0] == null).all(dim=1)
    assert 2 <= int(dropped.sum()) <= 10, dropped
    # the dropped rows are still scored for a cluster's taste, never for the null taste
    assert not (scored[0] == null).all(dim=1).any()
    assert torch.equal(asked[0][~dropped], scored[0][~dropped])


def test_a_checkpoint_resumes_without_unpickling(toy_assets, reward_run, tmp_path, monkeypatch):
    Trainer(toy_config(toy_assets, reward_run, tmp_path, "epochs=1")).fit(progress=False)
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "policy",
        "trainer_state.json",
        "trainer_state.safetensors",
    ]
    trainer = Trainer(toy_config(toy_assets, reward_run, tmp_path, "epochs=2"))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load on a resume")

    monkeypatch.setattr(torch, "load", refuse)
    history = trainer.fit(resume=True, progress=False)
    assert [h["epoch"] for h in history] == [0, 1]


def test_sample_draws_its_initial_noise_on_the_generators_device(toy_assets, reward_run, tmp_path):
    # a CPU generator cannot draw a CUDA tensor: x_T is drawn where the generator lives and
    # moved (on a GPU this used to crash; benchmarks/gpu_proof.py checks it there)
    from plural_diffusion.sampling import sample

    trainer = Trainer(toy_config(toy_assets, reward_run, tmp_path, "sampling.steps=2"))
    prompt, _, z, _ = trainer.draw_batch(3)
    embeds, negative = trainer._embeds(prompt)
    with torch.no_grad():
        traj = sample(
            trainer.unet,
            trainer.conditioner,
            trainer.pipe.vae,
            trainer.pipe.scheduler,
            embeds,
            negative,
            z,
            trainer.cfg.sampling,
            generator=torch.Generator().manual_seed(5),
        )
    expected = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        traj.latents[:, 0], expected * trainer.pipe.scheduler.init_noise_sigma
    )


def test_a_cosine_schedule_warms_up_falls_from_lr_to_lr_final_and_follows_the_epoch(
    toy_assets, reward_run, tmp_path
):
    schedule = ("lr=0.01", "lr_schedule=cosine", "lr_final=0.1", "epochs=5")
    cfg = toy_config(toy_assets, reward_run, tmp_path, *schedule, "sampling.steps=2")
    trainer = Trainer(cfg)
    rates = [trainer.learning_rate(e) for e in range(5)]
    assert rates[0] == pytest.approx(0.01) and rates[-1] == pytest.approx(0.001)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    trainer.epoch = 3  # as after a resume: the rate is the epoch's, not a counter's
    trainer.train_epoch()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(rates[3])
    warm = Trainer(toy_config(toy_assets, reward_run, tmp_path, *schedule, "lr_warmup=3"))
    warm_rates = [warm.learning_rate(e) for e in range(5)]
    assert warm_rates[:3] == pytest.approx([r * f for r, f in zip(rates, (0.25, 0.5, 0.75))])
    assert warm_rates[3:] == pytest.approx(rates[3:])
    bad = toy_config(toy_assets, reward_run, tmp_path, "lr_warmup=-1")
    with pytest.raises(UserError, match="lr_warmup=-1"):
        Trainer(bad)
    bad = toy_config(toy_assets, reward_run, tmp_path, "lr_final=1.5")
    with pytest.raises(UserError, match="lr_final=1.5"):
        Trainer(bad)
    bad = toy_config(toy_assets, reward_run, tmp_path, "ddpo.stat_fallback=prompt")
    with pytest.raises(UserError, match="ddpo.stat_fallback='prompt': use taste or batch"):
        Trainer(bad)


def test_ddpo_logs_the_first_updates_logprob_gap_and_warns_when_it_exceeds_clip_range(
    toy_assets, reward_run, tmp_path, monkeypatch
):
    """Before its first optimizer step the update recomputes the sampler's own log-probs: on
    the CPU in float32 the same numbers. A sampler whose stored log-probs are off (as bf16 on a
    GPU is when a minibatch mixes sampling batches: 2.9e-4 on an H200,
    benchmarks/results/gpu_proof-h200-gap.json) shows in the log, and more than clip_range is
    warned about: PPO would clip a change the policy never made."""
    same = "ddpo.sample_batch_size=3", "ddpo.sample_batches=2", "ddpo.train_batch_size=3"
    log = Trainer(ddpo_args(toy_assets, reward_run, tmp_path, *same)).train_epoch()
    assert log["logprob_gap"] == 0.0

    # a clip range the offset exceeds, whatever the toy config's
    trainer = Trainer(ddpo_args(toy_assets, reward_run, tmp_path, *same, "ddpo.clip_range=5e-4"))
    sample = trainer.policy.sample

    def off_by(*args, **kwargs):
        traj = sample(*args, **kwargs)
        traj.log_probs += 1e-3
        return traj

    monkeypatch.setattr(trainer.policy, "sample", off_by)
    with pytest.warns(UserWarning, match="recomputes log-probs 1.00e-03 away"):
        log = trainer.train_epoch()
    assert log["logprob_gap"] == pytest.approx(1e-3, rel=1e-3)


def test_old_log_probs_from_the_update_start_it_at_a_ratio_of_one_whatever_the_sampler_stored(
    toy_assets, reward_run, tmp_path, monkeypatch
):
    """`ddpo.old_log_probs=update`: the PPO ratio's denominator is the update's own forward
    before its first optimizer step, so a sampler whose arithmetic differs (a compiled UNet in
    bf16 on an H200: 1e-3, benchmarks/results/gpu_proof-h200-compile.json) clips nothing in
    that step; the log still shows how far the sampler was, without the warning. With the
    stored log-probs ("sampler") every term of that step is clipped."""
    one_step = (  # one minibatch, one optimizer step: every term before it
        "ddpo.sample_batch_size=3",
        "ddpo.sample_batches=1",
        "ddpo.train_batch_size=3",
        "ddpo.clip_range=5e-4",
    )
    logs = {}
    for source in ("sampler", "update"):
        trainer = Trainer(
            ddpo_args(toy_assets, reward_run, tmp_path, *one_step, f"ddpo.old_log_probs={source}")
        )
        sample = trainer.policy.sample

        def off_by(*args, _sample=sample, **kwargs):
            traj = _sample(*args, **kwargs)
            traj.log_probs += 1e-3
            return traj

        monkeypatch.setattr(trainer.policy, "sample", off_by)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logs[source] = trainer.train_epoch()
        warned = any("recomputes log-probs" in str(w.message) for w in caught)
        assert warned == (source == "sampler")
    assert logs["sampler"]["clipfrac"] == 1.0
    assert logs["update"]["clipfrac"] == 0.0 and logs["update"]["approx_kl"] == 0.0
    for log in logs.values():
        assert log["logprob_gap"] == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(UserError, match="ddpo.old_log_probs='cached': use sampler or update"):
        Trainer(ddpo_args(toy_assets, reward_run, tmp_path, "ddpo.old_log_probs=cached"))


def test_compile_unet_compiles_the_unet_in_place_for_every_caller(toy_assets, reward_run, tmp_path):
    """`compile_unet=true`: the UNet the sampler, the update and the saved policy call is the one
    module, compiled in place (its parameters' names unchanged); the compiled run itself is
    measured on a GPU (gpu_proof --set compile_unet=true)."""
    trainer = Trainer(ddpo_args(toy_assets, reward_run, tmp_path, "compile_unet=true"))
    assert trainer.unet._compiled_call_impl is not None
    assert trainer.policy.pipe.unet is trainer.unet
    plain = Trainer(ddpo_args(toy_assets, reward_run, tmp_path))
    assert plain.unet._compiled_call_impl is None
    assert trainer.unet.state_dict().keys() == plain.unet.state_dict().keys()


def test_shuffle_batches_trains_each_minibatch_on_one_whole_sampling_batch(
    toy_assets, reward_run, tmp_path
):
    """`ddpo.shuffle=batches`: the update's minibatches are the sampling batches themselves, in
    an order drawn per pass (bf16 GPU kernels give a row the same output only beside the same
    rows); `rows` shuffles rows across batches, as DDPO's reference does."""
    sizes = "ddpo.sample_batch_size=3", "ddpo.sample_batches=4", "ddpo.train_batch_size=3"
    trainer = Trainer(ddpo_args(toy_assets, reward_run, tmp_path, *sizes, "ddpo.shuffle=batches"))
    orders = [trainer._update_order(12) for _ in range(20)]
    for order in orders:
        chunks = order.view(4, 3)
        assert (chunks == chunks[:, :1] + torch.arange(3)).all()  # consecutive rows of a batch
        assert (chunks[:, 0] % 3 == 0).all()  # starting at a batch's first row
        assert sorted(order.tolist()) == list(range(12))
    assert len({tuple(o.tolist()) for o in orders}) > 1  # the batches' order is drawn
    log = trainer.train_epoch()
    assert log["logprob_gap"] == 0.0 and log["optimizer_steps"] > 0

    rows = Trainer(ddpo_args(toy_assets, reward_run, tmp_path, *sizes))
    mixed = [rows._update_order(12).view(4, 3) for _ in range(20)]
    assert any(((m // 3) != (m[:, :1] // 3)).any() for m in mixed)  # rows of several batches


def test_diversity_above_base_measures_the_base_aside_and_spares_looks_already_as_varied(
    toy_assets, reward_run, tmp_path
):
    """draft.diversity_above_base: the base model's within-taste similarity is measured on draws
    of its own (training then draws what it would have), and a batch no more alike than that
    pays nothing: with the reference at 1 (every pair identical) the update is the plain one."""
    common = (toy_assets, reward_run, tmp_path, "epochs=1")
    hinged = Trainer(
        toy_config(*common, "draft.diversity_weight=2", "draft.diversity_above_base=true")
    )
    plain = Trainer(toy_config(*common))
    assert 0 < hinged.base_similarity < 1 and plain.base_similarity is None
    hinged.base_similarity = 1.0
    hinged.train_epoch()
    plain.train_epoch()
    for name, value in lora_state(plain).items():
        torch.testing.assert_close(lora_state(hinged)[name], value, rtol=1e-5, atol=1e-7)


def test_train_closes_the_trainer_when_training_stops_with_an_error(
    toy_assets, reward_run, tmp_path, monkeypatch
):
    # a rank that exits still inside its gloo process group can abort at interpreter shutdown
    # (std::terminate), failing a finished run, so `train` leaves the group however fit ends
    from plural_diffusion.ddpo import train

    closed = []

    def stop(self, *args, **kwargs):
        raise UserError("non-finite reward at epoch 0; stopped")

    monkeypatch.setattr(Trainer, "fit", stop)
    monkeypatch.setattr(Trainer, "close", lambda self: closed.append(self.cfg.out_dir))
    cfg = toy_config(toy_assets, reward_run, tmp_path, "epochs=1")
    with pytest.raises(UserError, match="non-finite reward"):
        train(cfg)
    assert closed == [cfg.out_dir]


@pytest.mark.parametrize("fallback", ["taste", "batch"])
def test_ddpo_centres_a_rare_key_on_its_tastes_rewards_with_the_taste_fallback(
    toy_assets, reward_run, tmp_path, fallback
):
    """In the first epochs every (prompt, taste) key has fewer rewards than
    `ddpo.stat_min_count`. With `ddpo.stat_fallback=taste` each image is centred on its own
    taste's rewards (a taste whose head scores low still gets positive advantages for its
    better images); with `batch`, on every taste's rewards together."""
    cfg = toy_config(
        toy_assets,
        reward_run,
        tmp_path,
        "method=ddpo",
        "ddpo.stat_min_count=3",
        f"ddpo.stat_fallback={fallback}",
    )
    trainer = Trainer(cfg)
    prompt = torch.tensor([0, 1, 0, 1, 0, 1])
    taste = torch.tensor([0, 0, 0, 1, 1, 1])
    reward = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    mean, std = trainer._key_stats(prompt, taste, reward, cfg.ddpo.stat_fallback)
    if fallback == "taste":
        expected = [2.0, 2.0, 2.0, 20.0, 20.0, 20.0]
        assert std[0].item() == pytest.approx(reward[:3].std(unbiased=False).item(), rel=1e-4)
    else:
        expected = [11.0] * 6
    assert mean.tolist() == pytest.approx(expected)


def test_draft_normalises_a_rare_key_by_the_batch_whatever_ddpos_fallback(
    toy_assets, reward_run, tmp_path, monkeypatch
):
    """`ddpo.stat_fallback` is DDPO's: DRaFT's reward normalisation keeps the batch's std for a
    rare key (as measured), so a config that sets it for DDPO trains DRaFT alike."""
    cfg = toy_config(toy_assets, reward_run, tmp_path, "method=draft", "ddpo.stat_fallback=taste")
    trainer = Trainer(cfg)
    seen = []
    observe = trainer.tracker.observe

    def record(keys, rewards, groups=None):
        seen.append(groups)
        return observe(keys, rewards, groups)

    monkeypatch.setattr(trainer.tracker, "observe", record)
    trainer.train_epoch()
    assert seen and all(groups is None for groups in seen)


@pytest.mark.parametrize("start", ["first", "random"])
def test_ddpo_stochastic_window_draws_noise_and_trains_only_inside_it(
    toy_assets, reward_run, tmp_path, monkeypatch, start
):
    """`ddpo.stochastic_window=N`: N consecutive steps of an epoch's samples are drawn with
    the sampler's eta, the rest deterministically (log-prob 0), and the update trains on
    exactly those N steps."""
    import plural_diffusion.ddpo as ddpo_module

    trainer = Trainer(
        ddpo_args(
            toy_assets,
            reward_run,
            tmp_path,
            "sampling.steps=6",
            "ddpo.stochastic_window=2",
            f"ddpo.window_start={start}",
        )
    )
    trajectories, trained = [], []
    sample_batch = trainer._sample_batch

    def keep(*args, **kwargs):
        out = sample_batch(*args, **kwargs)
        trajectories.append(out[3])
        return out

    step = ddpo_module.ddim_step_with_logprob

    def record(scheduler, noise_pred, t, *args, **kwargs):
        trained.append(int(t))
        return step(scheduler, noise_pred, t, *args, **kwargs)

    monkeypatch.setattr(trainer, "_sample_batch", keep)
    monkeypatch.setattr(ddpo_module, "ddim_step_with_logprob", record)
    for _ in range(3):
        trajectories.clear()
        trained.clear()
        trainer.train_epoch()
        (traj,) = trajectories
        noisy = (traj.log_probs != 0).all(dim=0)  # [T]: steps with a log-prob in every row
        assert noisy.sum() == 2 and (traj.log_probs[:, ~noisy] == 0).all()
        first = int(noisy.nonzero()[0])
        assert noisy[first : first + 2].all()
        if start == "first":
            assert first == 0
        assert set(trained) == {int(t) for t in traj.timesteps[noisy]}
    # the policy is saved with the sampler it was trained for: a first-steps window is part of
    # it (held-out images, generate, evaluate); a window drawn per epoch is not one sampler
    window = 2 if start == "first" else 0
    assert trainer.policy.sampling.stochastic_steps == window
    trained = CheckpointInfo.read(trainer.policy.save_pretrained(tmp_path / "saved")).trained
    assert trained.sampling.stochastic_steps == window
    overridden = resolve_settings(SamplingOverrides(eta=0.5), trained).sampling
    assert overridden == dataclasses.replace(trained.sampling, eta=0.5)
    prompt, _, z, noise = trainer.draw_batch(2)
    embeds, negative = trainer._embeds(prompt)
    with torch.no_grad():
        traj = trainer.policy.sample(
            prompt_embeds=embeds, negative_embeds=negative, tastes=z, noise=noise
        )
    assert ((traj.log_probs != 0).all(dim=0).sum()) == (window or 6)


def test_deterministic_steps_do_not_depend_on_the_generator(toy_assets, reward_run, tmp_path):
    trainer = Trainer(toy_config(toy_assets, reward_run, tmp_path, "sampling.steps=6"))
    prompt, _, z, noise = trainer.draw_batch(3)
    embeds, negative = trainer._embeds(prompt)
    window = torch.tensor([False, False, False, True, True, False])
    runs = []
    for seed in (1, 2):
        with torch.no_grad():
            runs.append(
                trainer.policy.sample(
                    prompt_embeds=embeds,
                    negative_embeds=negative,
                    tastes=z,
                    noise=noise,
                    generator=torch.Generator().manual_seed(seed),
                    stochastic=window,
                )
            )
    a, b = runs
    # x_T .. x_3 come from deterministic steps: the same for both generators
    torch.testing.assert_close(a.latents[:, :4], b.latents[:, :4])
    assert not torch.allclose(a.latents[:, 4], b.latents[:, 4])  # the window's noise
    assert (a.log_probs[:, ~window] == 0).all() and (a.log_probs[:, window] != 0).all()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("ddpo.stochastic_window=-1", "ddpo.stochastic_window=-1: steps, >= 0"),
        ("ddpo.window_start=last", "use first or random"),
        ("sampling.stochastic_steps=3", "set ddpo.stochastic_window instead"),
        ("ddpo.shuffle=prompts", "ddpo.shuffle='prompts': use rows or batches"),
        ("ddpo.shuffle=batches", "set ddpo.train_batch_size=3 .ddpo.sample_batch_size."),
    ],
)
def test_a_ddpo_sampling_option_that_cannot_apply_stops_with_a_one_line_error(
    toy_assets, reward_run, tmp_path, option, message
):
    with pytest.raises(UserError, match=message):
        Trainer(
            ddpo_args(
                toy_assets,
                reward_run,
                tmp_path,
                "sampling.steps=6",
                "ddpo.sample_batch_size=3",
                "ddpo.train_batch_size=4",
                option,
            )
        )


def test_a_window_as_long_as_the_sampler_makes_every_step_stochastic(
    toy_assets, reward_run, tmp_path
):
    for window in (0, 6, 10):
        cfg = ddpo_args(
            toy_assets, reward_run, tmp_path, "sampling.steps=6", f"ddpo.stochastic_window={window}"
        )
        assert Trainer(cfg)._stochastic_window() is None


def test_draft_batch_per_taste_gives_each_expert_the_images_a_taste_blind_policy_gets(
    toy_assets, reward_run, tmp_path, monkeypatch
):
    """With `draft.batch_per_taste` each taste cluster's expert learns from `batch_size`
    images a step, as the taste-blind policy's one LoRA does: matched over K clusters draws K
    times as many."""
    drawn = {}
    for objective in ("matched", "mean"):
        trainer = Trainer(
            toy_config(
                toy_assets,
                reward_run,
                tmp_path / objective,
                f"objective={objective}",
                "draft.batch_size=2",
                "draft.batch_per_taste=true",
            )
        )
        draw, drawn[objective] = trainer.draw_batch, []

        def record(batch, draw=draw, seen=drawn[objective]):
            prompt, taste, z, noise = draw(batch)
            seen.append(taste.bincount().tolist())
            return prompt, taste, z, noise

        monkeypatch.setattr(trainer, "draw_batch", record)
        trainer.train_epoch()
    k = len(trainer.rewards.cluster_names)
    assert drawn["matched"] == [[2] * k]  # one step: two images for each cluster
    assert drawn["mean"] == [[2]]  # the taste-blind policy's one "none" taste


def test_batch_per_taste_without_taste_experts_stops_with_a_one_line_error(
    toy_assets, reward_run, tmp_path
):
    with pytest.raises(UserError, match="draft.batch_per_taste=true draws draft.batch_size"):
        Trainer(
            toy_config(
                toy_assets,
                reward_run,
                tmp_path,
                "draft.batch_per_taste=true",
                "taste.source=raters",
                "select_experts=false",
                "restart_experts=false",
            )
        )
