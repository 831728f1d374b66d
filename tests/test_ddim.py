"""DDIM step with log-probability: equal to diffusers' step, exact Gaussian density, no NaN."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from plural_diffusion.ddim import ddim_posterior, ddim_step_with_logprob, trainable_step_mask
from reward_models.errors import UserError

SHAPE = (3, 4, 8, 8)


def sd_scheduler(prediction_type: str = "epsilon", **overrides) -> DDIMScheduler:
    """The DDIM settings SD 1.x (epsilon) and SD 2.x (v_prediction) ship with, 10 steps."""
    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    config.update(overrides)
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(10)
    return scheduler


def random_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


SCHEDULERS = {
    "sd1-epsilon": lambda: sd_scheduler("epsilon"),
    "sd2-v": lambda: sd_scheduler("v_prediction"),
    "clip-sample": lambda: sd_scheduler("epsilon", clip_sample=True, clip_sample_range=1.0),
    "thresholding": lambda: sd_scheduler("epsilon", thresholding=True, sample_max_value=1.5),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_prev_sample_equals_diffusers_step_for_a_shared_timestep(name, eta):
    scheduler = SCHEDULERS[name]()
    model_output, sample = random_inputs(0)
    for t in scheduler.timesteps[[0, 4, 9]]:
        ours, _ = ddim_step_with_logprob(
            scheduler, model_output, t, sample, eta=eta, generator=torch.Generator().manual_seed(7)
        )
        noise = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(7))
        theirs = scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_per_sample_timesteps_equal_one_diffusers_step_per_row(prediction_type):
    scheduler = sd_scheduler(prediction_type)
    model_output, sample = random_inputs(1)
    timesteps = scheduler.timesteps[[0, 5, 9]]  # 901, 401, 1: three different noise levels
    ours, _ = ddim_step_with_logprob(
        scheduler, model_output, timesteps, sample, generator=torch.Generator().manual_seed(3)
    )
    noise = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(3))
    for i, t in enumerate(timesteps):
        row = slice(i, i + 1)
        theirs = scheduler.step(
            model_output[row], t, sample[row], eta=1.0, variance_noise=noise[row]
        ).prev_sample
        torch.testing.assert_close(ours[row], theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_log_prob_is_the_gaussian_density_averaged_over_pixels(prediction_type):
    scheduler = sd_scheduler(prediction_type)
    model_output, sample = random_inputs(2)
    timesteps = scheduler.timesteps[[1, 3, 8]]
    prev, log_prob = ddim_step_with_logprob(
        scheduler, model_output, timesteps, sample, generator=torch.Generator().manual_seed(0)
    )
    mean, std = ddim_posterior(scheduler, model_output, timesteps, sample)
    expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    assert log_prob.shape == (3,)
    torch.testing.assert_close(log_prob, expected, atol=1e-5, rtol=1e-6)
    # std grows with the noise level: the sample at t=801 is less likely per pixel than at t=201
    assert std.flatten().tolist() == sorted(std.flatten().tolist(), reverse=True)
    assert log_prob[0] < log_prob[2]


def test_rescoring_a_stored_sample_reproduces_its_log_prob_and_a_foreign_one_scores_lower():
    scheduler = sd_scheduler()
    model_output, sample = random_inputs(3)
    t = scheduler.timesteps[2]
    prev, log_prob = ddim_step_with_logprob(
        scheduler, model_output, t, sample, generator=torch.Generator().manual_seed(1)
    )
    _, rescored = ddim_step_with_logprob(scheduler, model_output, t, sample, prev_sample=prev)
    torch.testing.assert_close(rescored, log_prob, atol=0, rtol=0)
    # the same x_{t-1} under a different policy output: PPO's importance ratio moves away from 1
    other_output = model_output + 0.5
    _, foreign = ddim_step_with_logprob(scheduler, other_output, t, sample, prev_sample=prev)
    assert (foreign < log_prob - 1e-3).all()


def test_log_prob_is_differentiable_in_model_output_and_ascent_raises_it():
    scheduler = sd_scheduler()
    model_output, sample = random_inputs(4)
    t = scheduler.timesteps[5]
    prev, _ = ddim_step_with_logprob(
        scheduler, model_output, t, sample, generator=torch.Generator().manual_seed(2)
    )
    policy_output = (model_output + 0.1).requires_grad_(True)
    _, log_prob = ddim_step_with_logprob(scheduler, policy_output, t, sample, prev_sample=prev)
    log_prob.sum().backward()
    grad = policy_output.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the drawn sample itself is differentiable too (reward backpropagation through the last steps)
    draw_output = model_output.clone().requires_grad_(True)
    drawn, _ = ddim_step_with_logprob(
        scheduler, draw_output, t, sample, generator=torch.Generator()
    )
    drawn.sum().backward()
    assert draw_output.grad.abs().min() > 0
    with torch.no_grad():
        _, after = ddim_step_with_logprob(
            scheduler, policy_output + 1e-2 * grad / grad.norm(), t, sample, prev_sample=prev
        )
    assert (after > log_prob.detach()).all()


@pytest.mark.parametrize(
    "overrides",
    [dict(steps_offset=0, set_alpha_to_one=True), dict(steps_offset=0, set_alpha_to_one=False)],
    ids=["alpha-to-one", "offset-0"],
)
def test_zero_variance_last_step_is_masked_and_never_nan(overrides):
    scheduler = sd_scheduler("epsilon", **overrides)
    assert scheduler.timesteps[-1] == 0  # its posterior variance is exactly 0
    mask = trainable_step_mask(scheduler)
    assert mask.tolist() == [True] * 9 + [False]

    # a whole 10-step trajectory with gradients: nothing is NaN or infinite anywhere
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(SHAPE, generator=g)
    outputs = torch.randn((10, *SHAPE), generator=g).requires_grad_(True)
    log_probs = []
    for i, t in enumerate(scheduler.timesteps):
        latents, log_prob = ddim_step_with_logprob(scheduler, outputs[i], t, latents, generator=g)
        assert torch.isfinite(latents).all() and torch.isfinite(log_prob).all()
        log_probs.append(log_prob)
    log_probs = torch.stack(log_probs)  # [T, B]
    assert (log_probs[-1] == 0).all() and (log_probs[:-1] != 0).all()
    log_probs.sum().backward()
    assert torch.isfinite(outputs.grad).all()
    assert (outputs.grad[-1] == 0).all() and (outputs.grad[-2] != 0).any()


def test_zero_variance_step_is_deterministic_whatever_the_generator():
    scheduler = sd_scheduler("epsilon", steps_offset=0, set_alpha_to_one=True)
    model_output, sample = random_inputs(6)
    t = scheduler.timesteps[-1]
    a, _ = ddim_step_with_logprob(
        scheduler, model_output, t, sample, generator=torch.Generator().manual_seed(0)
    )
    b, _ = ddim_step_with_logprob(
        scheduler, model_output, t, sample, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, scheduler.step(model_output, t, sample, eta=1.0).prev_sample)


def test_eta_zero_is_plain_ddim_with_no_trainable_step():
    scheduler = sd_scheduler()
    model_output, sample = random_inputs(7)
    t = scheduler.timesteps[3]
    prev, log_prob = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=0.0)
    torch.testing.assert_close(prev, scheduler.step(model_output, t, sample, eta=0.0).prev_sample)
    assert (log_prob == 0).all()
    assert not trainable_step_mask(scheduler, eta=0.0).any()


def test_user_mistakes_are_one_line_errors():
    scheduler = sd_scheduler()
    model_output, sample = random_inputs(8)
    with pytest.raises(UserError, match="2 timesteps for a batch of 3"):
        ddim_step_with_logprob(scheduler, model_output, scheduler.timesteps[:2], sample)
    with pytest.raises(UserError, match="eta=1.5"):
        ddim_step_with_logprob(scheduler, model_output, scheduler.timesteps[0], sample, eta=1.5)
    with pytest.raises(UserError, match="set_timesteps"):
        ddim_step_with_logprob(DDIMScheduler(), model_output, 1, sample)
