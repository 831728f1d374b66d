"""The toy base's autoencoder: a tiny diffusers `AutoencoderKL`, 32x32x3 images <-> 4x8x8 latents.

Trained first and on its own (reconstruction + a small KL term), like SD's VAE; the denoiser is
then trained on its latents, scaled to unit variance by `scaling_factor` in the VAE's config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm


@dataclass
class ToyVAEConfig:
    """Sizes and training hyper-parameters of the toy VAE."""

    # One entry per block; every block but the last halves the resolution, so 3 blocks map
    # 32x32 images to 8x8 latents (SD's 8x factor would leave 4x4, too coarse for 1-3 shapes).
    # (16, 32, 32) rather than (8, 16, 32): with the narrower decoder, samples of the trained
    # base came out as horizontal stripes with no visible shapes (base Vendi 1.5 vs 3.4).
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    # Self-attention in the 8x8 mid block buys nothing for flat toy images and costs time.
    mid_block_add_attention: bool = False
    # Batch 16 at a high learning rate decayed to zero (cosine) was, of the settings measured,
    # the fastest on a CPU to get past the plateau where the decoder outputs grey images.
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    # Weight of the chroma error next to the luma error (see `reconstruction_loss`).
    chroma_weight: float = 1.5
    # Weight of KL(q(z|x) || N(0, I)) summed over latent elements, next to the per-pixel error;
    # small, as in SD, so the latents stay informative while their scale stays bounded.
    kl_weight: float = 1e-6
    # Initial log-variance of the posterior. diffusers initialises it near 0 (std 1, far larger
    # than the untrained encoder's means); a short run does not shrink it, and a decoder fed
    # that much noise learns only the mean colour. Starting nearly deterministic fixes that.
    init_logvar: float = -14.0


def build_vae(cfg: ToyVAEConfig, image_size: int) -> AutoencoderKL:
    """A freshly initialised (global torch RNG) toy `AutoencoderKL` for RGB `image_size` images."""
    n = len(cfg.block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=image_size,
        mid_block_add_attention=cfg.mid_block_add_attention,
    )
    with torch.no_grad():
        # quant_conv outputs [mean, logvar] stacked on channels
        vae.quant_conv.bias[cfg.latent_channels :] = cfg.init_logvar
    zero_residual_branches(vae)
    return vae


@torch.no_grad()
def zero_residual_branches(model: torch.nn.Module) -> None:
    """Zero the last layer of every residual branch (ResNet blocks, transformer blocks).

    As ADM's `zero_module` and Fixup do: the untrained network is then a shallow stack of its
    skip paths. On the toy data this sped up both the VAE and the UNet: with 200 UNet steps the
    dark-vs-bright gap of samples went from 0.07 to 0.22.
    """
    for module in model.modules():
        if isinstance(module, ResnetBlock2D):
            last = module.conv2
        elif isinstance(module, Transformer2DModel):
            last = module.proj_out
        else:
            continue
        last.weight.zero_()
        last.bias.zero_()


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, chroma_weight: float):
    """Mean squared error of [B, 3, H, W] images, split into luma and chroma (YCbCr-like).

    Plain RGB MSE is dominated by luma, and the decoder then ignores colour for most of a short
    run; weighting the two colour-difference channels up makes colour as urgent as brightness.
    """
    err = recon - target
    luma = 0.299 * err[:, 0] + 0.587 * err[:, 1] + 0.114 * err[:, 2]  # [B, H, W]
    blue_diff, red_diff = err[:, 2] - luma, err[:, 0] - luma
    return luma.pow(2).mean() + chroma_weight * (blue_diff.pow(2).mean() + red_diff.pow(2).mean())


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    cfg: ToyVAEConfig,
    generator: torch.Generator,
    progress: bool = True,
) -> dict[str, float]:
    """Train `vae` in place on `images` [N, 3, H, W] in [0, 1]; returns final loss figures.

    The VAE works in SD's pixel range [-1, 1]. Batches and posterior samples come from
    `generator`, so the result is a function of the initial weights and the generator's seed.
    """
    pixels = images * 2.0 - 1.0  # [N, 3, H, W] in [-1, 1]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = get_scheduler(
        "cosine", optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps
    )
    vae.train()
    bar = tqdm(range(cfg.steps), desc="toy VAE", disable=not progress, leave=False)
    mse_ema = kl_ema = None
    for _ in bar:
        idx = torch.randint(len(pixels), (cfg.batch_size,), generator=generator)
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator)
        z = posterior.mean + posterior.std * eps  # reparameterised sample
        recon = vae.decode(z).sample
        kl = posterior.kl().mean()  # per-image sum over latent elements, batch mean
        loss = reconstruction_loss(recon, x, cfg.chroma_weight) + cfg.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        mse = torch.nn.functional.mse_loss(recon.detach(), x).item()
        mse_ema = mse if mse_ema is None else 0.95 * mse_ema + 0.05 * mse
        kl_ema = kl.item() if kl_ema is None else 0.95 * kl_ema + 0.05 * kl.item()
        bar.set_postfix(mse=f"{mse_ema:.4f}", kl=f"{kl_ema:.1f}")
    vae.eval()
    return {"vae_mse": float(mse_ema), "vae_kl": float(kl_ema)}


@torch.no_grad()
def encode_posteriors(
    vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std [N, C, h, w] (unscaled latents) of `images` [N, 3, H, W] in [0, 1]."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size] * 2.0 - 1.0).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator):
    """1 / std of posterior samples over the whole set, as SD measured its `scaling_factor`."""
    z = mean + std * torch.randn(mean.shape, generator=generator)
    return float(1.0 / z.std())
