"""One DDIM step as a Gaussian policy: the next latent and its exact log-probability.

DDPO treats the denoising loop as an MDP. With `eta > 0` a DDIM step draws

    x_{t-1} ~ N(mean_theta(x_t, t), std_t^2 I),    std_t = eta * sqrt(variance_t)

so the log-probability of the sampled `x_{t-1}` is exact and differentiable in the model output.
diffusers' `DDIMScheduler.step` computes the same mean but not the density, and only for one
timestep shared by the batch; this module reproduces its arithmetic (step by step, in float32) for
per-sample timesteps and adds the density. The recipe follows DDPO's reference `ddim_step_with_logprob`.

Zero-variance steps. When the previous alpha product equals the current one (the last step of
`steps_offset=0` schedules, or any final step with `set_alpha_to_one=True`) the posterior variance
is exactly 0: the step is deterministic, its density is a Dirac and its log-probability undefined
(the naive formula gives 0/0 = NaN and poisons the whole PPO update). Such steps return
`log_prob = 0` with zero gradient; `trainable_step_mask` tells the trainer which steps they are so
it can skip them, and they are never trained on. `eta = 0` makes every step such a step.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from reward_models.errors import UserError

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _check(scheduler: DDIMScheduler, eta: float) -> None:
    if not isinstance(scheduler, DDIMScheduler):
        raise UserError(
            f"scheduler {type(scheduler).__name__}: DDPO needs a DDIMScheduler; "
            "build one with DDIMScheduler.from_config(pipe.scheduler.config)"
        )
    if scheduler.num_inference_steps is None:
        raise UserError("DDIM scheduler has no timesteps; call scheduler.set_timesteps(n) first")
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"eta={eta}: must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like)")


def _alpha_products(
    scheduler: DDIMScheduler, timestep: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_bar at `timestep` and at the previous DDIM timestep, as float32 CPU tensors.

    `timestep` is a scalar or a [B] tensor; the outputs have its shape. The previous timestep is
    `t - num_train_timesteps // num_inference_steps`, and a negative one reads
    `final_alpha_cumprod`, exactly as `DDIMScheduler.step` does.
    """
    # The table lives on the CPU; indexing it there costs one tiny device sync per step.
    t = torch.as_tensor(timestep).detach().to("cpu", torch.long)
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_t = t - stride
    alphas = scheduler.alphas_cumprod
    alpha_prod_t = alphas[t]
    alpha_prod_t_prev = torch.where(
        prev_t >= 0, alphas[prev_t.clamp(min=0)], scheduler.final_alpha_cumprod.to(alphas.dtype)
    )
    return alpha_prod_t, alpha_prod_t_prev


def _posterior_variance(
    alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor
) -> torch.Tensor:
    """`DDIMScheduler._get_variance`, elementwise: formula (16) of the DDIM paper without eta^2."""
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    return (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)


def trainable_step_mask(
    scheduler: DDIMScheduler, timesteps: torch.Tensor | None = None, eta: float = 1.0
) -> torch.Tensor:
    """bool [T]: True where a DDIM step at that timestep has a positive std (a defined log-prob).

    `timesteps` defaults to `scheduler.timesteps`. The trainer must not train on False steps:
    `ddim_step_with_logprob` returns log_prob 0 for them (see the module docstring).
    """
    _check(scheduler, eta)
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    alpha_prod_t, alpha_prod_t_prev = _alpha_products(scheduler, timesteps)
    return (eta * _posterior_variance(alpha_prod_t, alpha_prod_t_prev).sqrt()) > 0


def ddim_posterior(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the DDIM step distribution p(x_{t-1} | x_t), in float32.

    Args:
        model_output: [B, C, H, W] the UNet output (epsilon, v or x0, per the scheduler's
            `prediction_type`).
        timestep: scalar or [B] current timesteps (values of `scheduler.timesteps`).
        sample: [B, C, H, W] x_t.
    Returns:
        mean [B, C, H, W] float32 and std [B, 1, 1, 1] float32 (0 on zero-variance steps).
        For two policies on the same x_t (e.g. the KL to the base model) the KL of the step is
        `((mean_a - mean_b) ** 2).sum() / (2 * std ** 2)` since the std does not depend on the model.
    """
    _check(scheduler, eta)
    batch = sample.shape[0]
    bshape = (batch,) + (1,) * (sample.ndim - 1)
    n_timesteps = torch.as_tensor(timestep).numel()
    if n_timesteps not in (1, batch):
        raise UserError(f"{n_timesteps} timesteps for a batch of {batch}: pass a scalar or [B]")
    alpha_prod_t, alpha_prod_t_prev = _alpha_products(scheduler, timestep)
    std = eta * _posterior_variance(alpha_prod_t, alpha_prod_t_prev).sqrt()

    def per_sample(x: torch.Tensor) -> torch.Tensor:  # scalar or [B] -> [B, 1, 1, 1]
        return x.reshape(-1).expand(batch).reshape(bshape).to(sample.device)

    alpha_prod_t, alpha_prod_t_prev = per_sample(alpha_prod_t), per_sample(alpha_prod_t_prev)
    std = per_sample(std)
    beta_prod_t = 1 - alpha_prod_t
    model_output = model_output.float()
    sample = sample.float()

    # predicted x_0 and epsilon: formula (12) of the DDIM paper, as DDIMScheduler.step
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
    elif prediction_type == "v_prediction":
        pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    else:
        raise UserError(
            f"scheduler prediction_type={prediction_type!r}: expected epsilon, sample or v_prediction"
        )

    if scheduler.config.thresholding:
        pred_original_sample = scheduler._threshold_sample(pred_original_sample)
    elif scheduler.config.clip_sample:
        clip = scheduler.config.clip_sample_range
        pred_original_sample = pred_original_sample.clamp(-clip, clip)

    # Analytically 1 - a_prev - std^2 >= 0 for eta <= 1; the clamp only absorbs float rounding
    # that would otherwise turn the square root into NaN.
    direction_coef = (1 - alpha_prod_t_prev - std**2).clamp(min=0) ** 0.5
    mean = alpha_prod_t_prev**0.5 * pred_original_sample + direction_coef * pred_epsilon
    return mean, std


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} and the log-density of x_{t-1} under it.

    Args:
        scheduler: a `DDIMScheduler` after `set_timesteps`.
        model_output: [B, C, H, W] UNet output; gradients flow from `log_prob` into it.
        timestep: scalar or [B] current timesteps.
        sample: [B, C, H, W] x_t.
        eta: noise scale in [0, 1]; DDPO uses 1.
        prev_sample: [B, C, H, W] an x_{t-1} to score (the trainer re-scores stored trajectories
            under the current policy); None draws one.
        generator: for the draw. With the same generator state the draw equals
            `scheduler.step(model_output, t, sample, eta, generator=...)` (same noise call).
    Returns:
        prev_sample [B, C, H, W] in `sample.dtype`, and log_prob [B] float32: the Gaussian
        log-density averaged over all non-batch dimensions (nats per element). Zero-variance
        steps give the deterministic mean and log_prob 0 with zero gradient.
    """
    mean, std = ddim_posterior(scheduler, model_output, timestep, sample, eta)
    has_noise = std > 0  # [B, 1, 1, 1]
    if prev_sample is None:
        noise = randn_tensor(
            model_output.shape,
            generator=generator,
            device=model_output.device,
            dtype=model_output.dtype,
        )
        prev_sample = (mean + std * noise.float()).to(sample.dtype)

    # Dividing by a zero std would give NaN values and NaN gradients even under a torch.where, so
    # zero-variance samples are scored against std 1 and then masked out.
    safe_std = torch.where(has_noise, std, torch.ones_like(std))
    x = prev_sample.detach().float()
    log_prob = -((x - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    log_prob = torch.where(has_noise.flatten(), log_prob, torch.zeros_like(log_prob))
    return prev_sample, log_prob
