"""Sampling with log-probabilities: the DDIM loop as a policy, trajectories kept for training.

One UNet call per step evaluates both halves of classifier-free guidance (batched CFG). The
unconditional half sees the empty prompt *and* the null taste, so guidance amplifies what the
prompt and the taste ask for together. Every step is a Gaussian policy step
(`ddim_step_with_logprob`); its log-probability is what DDPO's importance ratio compares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from plural_diffusion.conditioning import TasteConditioner, unet_forward
from plural_diffusion.ddim import ddim_step_with_logprob


@dataclass
class SamplingConfig:
    steps: int = 20
    guidance_scale: float = 4.0
    eta: float = 1.0  # DDIM noise: > 0 makes every step a stochastic policy
    # with eta > 0, only the first N steps draw noise and the rest are deterministic DDIM
    # (0: every step). Not set by hand: a DDPO policy trained with `ddpo.stochastic_window: N`
    # saves it, so that it generates and is evaluated with the sampler it was trained on
    stochastic_steps: int = 0


@dataclass
class Trajectory:
    """A batch of denoising trajectories and what the trainer needs to re-score them."""

    latents: torch.Tensor  # [B, T + 1, C, h, w]: x_T, ..., x_0
    log_probs: torch.Tensor  # [B, T] float32, log p(x_{t-1} | x_t) under the sampling policy
    timesteps: torch.Tensor  # [T] long
    prompt_embeds: torch.Tensor  # [B, L, C]
    negative_embeds: torch.Tensor  # [B, L, C]
    taste: torch.Tensor | None  # [B, d]; None = no taste (null)
    images: torch.Tensor  # [B, 3, H, W] float in [0, 1]


def guided_noise(
    unet,
    conditioner: TasteConditioner | None,
    latents: torch.Tensor,
    t: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    taste: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """The guided model output for latents [B, C, h, w], one UNet call on [uncond; cond]."""
    if guidance_scale == 1.0:
        return unet_forward(unet, conditioner, latents, t, prompt_embeds, taste).float()
    batch = latents.shape[0]
    z = route = None
    if conditioner is not None:
        null = conditioner.null_taste(batch)
        asked = null if taste is None else taste.to(null.dtype)
        z = torch.cat([null, asked])
        route = torch.cat([asked, asked])  # both halves through the taste's LoRA experts
    out = unet_forward(
        unet,
        conditioner,
        torch.cat([latents, latents]),
        t,
        torch.cat([negative_embeds, prompt_embeds]),
        z,
        route=route,
    )
    uncond, cond = out.float().chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def decode_images(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (differentiable)."""
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    images = images.float() / 2 + 0.5
    # straight-through clamp: the values are clamped, the gradient passes unclipped. A plain
    # clamp gives a blown-out (or crushed) image zero gradient, and a reward backpropagated to
    # it could never pull it back into range (measured: a base whose samples are mostly white
    # left one taste's LoRA expert without any signal)
    return images + (images.clamp(0, 1) - images).detach()


def sample(
    unet,
    conditioner: TasteConditioner | None,
    vae,
    scheduler,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    taste: torch.Tensor | None,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    init_latents: torch.Tensor | None = None,
    grad_last_steps: int = 0,
    stochastic: torch.Tensor | None = None,
) -> Trajectory:
    """Run the DDIM policy from noise to images.

    grad_last_steps: 0 for DDPO (no graph kept); K > 0 keeps the graph through the last K
        steps and the decoder (DRaFT-K / AlignProp-style reward backpropagation).
    init_latents: [B, C, h, w] x_T; drawn from `generator` when None (on the generator's
        device, then moved: a CPU generator gives the same noise on every device).
    stochastic: bool [T], the steps drawn with `cfg.eta`; the others are deterministic DDIM
        (eta 0, log-prob 0). None: the first `cfg.stochastic_steps` steps, or every step when
        that is 0.
    """
    batch = prompt_embeds.shape[0]
    scheduler.set_timesteps(cfg.steps, device=prompt_embeds.device)
    timesteps = scheduler.timesteps
    if stochastic is None and 0 < cfg.stochastic_steps < len(timesteps):
        stochastic = torch.arange(len(timesteps)) < cfg.stochastic_steps
    if init_latents is None:
        channels, size = unet.config.in_channels, unet.config.sample_size
        init_latents = randn_tensor(
            (batch, channels, size, size), generator=generator, device=prompt_embeds.device
        )
    latents = init_latents * scheduler.init_noise_sigma
    all_latents, log_probs = [latents.detach()], []
    first_grad_step = len(timesteps) - grad_last_steps
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(i >= first_grad_step and torch.is_grad_enabled()):
            noise_pred = guided_noise(
                unet,
                conditioner,
                latents,
                t,
                prompt_embeds,
                negative_embeds,
                taste,
                cfg.guidance_scale,
            )
            eta = cfg.eta if stochastic is None or stochastic[i] else 0.0
            latents, log_prob = ddim_step_with_logprob(
                scheduler, noise_pred, t, latents, eta=eta, generator=generator
            )
        all_latents.append(latents.detach())
        log_probs.append(log_prob.detach())
    with torch.set_grad_enabled(grad_last_steps > 0 and torch.is_grad_enabled()):
        images = decode_images(vae, latents)
    return Trajectory(
        latents=torch.stack(all_latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        timesteps=timesteps.clone(),
        prompt_embeds=prompt_embeds,
        negative_embeds=negative_embeds,
        taste=taste,
        images=images,
    )
