"""The toy world's base model: a tiny but real Stable Diffusion, trained here from a seed.

`train_toy_base(cfg, out_dir)` trains, on `make_images` pictures and captions,

1. a tiny `AutoencoderKL` (32x32x3 <-> 4x8x8), reconstruction + small KL (see `vae.py`);
2. a tiny `CLIPTextModel` and a tiny `UNet2DConditionModel` jointly: DDPM noising
   (`DDPMScheduler`, SD 1.x betas, offset noise), the UNet predicts epsilon, its squared error
   weighted per timestep as in the v-prediction loss (see `ToyUNetConfig`), and ~10% empty
   captions so classifier-free guidance works;

and saves a `StableDiffusionPipeline` directory (DDIM scheduler in SD's settings) that
`StableDiffusionPipeline.from_pretrained` loads like any SD checkpoint. The UNet reads the prompt
only through cross-attention on the text encoder's hidden states, which is where taste tokens are
appended later.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from plural_diffusion.toyworld.images import make_images
from plural_diffusion.toyworld.tokenizer import VOCAB_SIZE, build_clip_tokenizer
from plural_diffusion.toyworld.vae import (
    ToyVAEConfig,
    build_vae,
    encode_posteriors,
    latent_scaling_factor,
    train_vae,
    zero_residual_branches,
)
from reward_models.config import to_dict
from reward_models.errors import UserError
from reward_models.io import atomic_dir, write_json

# SD 1.x noise schedule; the DDPM (training) and DDIM (sampling) schedulers share it.
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


@dataclass
class ToyTextConfig:
    """The tiny CLIP text encoder (CLIP's 49408-token vocabulary, `max_length` positions)."""

    # 64 rather than 32: in one measurement it doubled how far "vivid" vs "grey" prompts move
    # colourfulness, for 5% more training time.
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4


@dataclass
class ToyUNetConfig:
    """The tiny denoiser on 4x8x8 latents, and its joint training with the text encoder."""

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    # diffusers reads this as the number of heads per block (a historical misnomer).
    attention_head_dim: int = 4
    norm_num_groups: int = 8
    steps: int = 450
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    # Per-timestep weight of the epsilon MSE. "epsilon": DDPM's unweighted loss. "v": weight
    # 1 / alpha_bar_t, which is the v-prediction loss of SD 2 written for an epsilon-predicting
    # model (the UNet still predicts epsilon). The plain loss gives almost no weight to the noisy
    # timesteps where only the prompt can set the image's brightness and colour; measured on a
    # small config, "v" widened the dark-vs-bright brightness gap from 0.07 to 0.5.
    loss_weighting: Literal["v", "epsilon"] = "v"
    # Cap on that weight (1 / alpha_bar_t reaches 214 at t = T): a few nearly pure-noise samples
    # would otherwise dominate each batch's gradient; 25 (reached at t ~ 700) measured best of
    # 5, 12, 25, 50 and no cap.
    max_loss_weight: float = 25.0
    # Offset noise (Guttenberg 2023): a per-image, per-channel constant added to the noise.
    # SD's schedule leaves some signal at t = T, and a toy image's brightness sits in its
    # latents' per-channel means, which therefore show through the noise early; the model then
    # reads brightness off the noisy latents instead of the prompt. Hiding those means makes
    # the prompt matter: on a small config the dark-vs-bright gap went 0.07 (0) -> 0.17 (0.1)
    # -> 0.45 (0.3); on the default config it also widened the vivid-vs-grey colourfulness gap.
    noise_offset: float = 0.3
    # Share of training captions replaced by the empty prompt, for classifier-free guidance.
    caption_dropout: float = 0.1


@dataclass
class ToyBaseConfig:
    """Every hyper-parameter of the toy base, with the defaults `train_toy_base` uses."""

    seed: int = 0
    n_images: int = 2048
    image_size: int = 32
    # Prompt length in tokens (sot and eot included) = the text encoder's positions.
    max_length: int = 32
    # CPU threads while training. One: the machines this runs on are shared, and two OpenMP
    # threads competing with other jobs for two cores spend their time waiting on each other.
    num_threads: int = 1
    text: ToyTextConfig = field(default_factory=ToyTextConfig)
    vae: ToyVAEConfig = field(default_factory=ToyVAEConfig)
    unet: ToyUNetConfig = field(default_factory=ToyUNetConfig)


def build_text_encoder(cfg: ToyTextConfig, max_length: int) -> CLIPTextModel:
    """A freshly initialised (global torch RNG) tiny `CLIPTextModel` on CLIP's token ids."""
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=max_length,
        # CLIP's ids: pooling looks for eot (49407) to find each prompt's end.
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_unet(cfg: ToyUNetConfig, latent_size: int, latent_channels: int, cross_dim: int):
    """A freshly initialised (global torch RNG) tiny `UNet2DConditionModel`, text cross-attention
    in every block."""
    n = len(cfg.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cross_dim,
    )
    zero_residual_branches(unet)
    return unet


def sd_ddim_scheduler() -> DDIMScheduler:
    """DDIM with the settings SD 1.x checkpoints ship (leading spacing, steps_offset=1)."""
    return DDIMScheduler(
        **SD_SCHEDULE,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids [N, max_length] padded as the SD pipeline pads prompts."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def train_denoiser(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: tuple[torch.Tensor, torch.Tensor],
    caption_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    cfg: ToyUNetConfig,
    generator: torch.Generator,
    progress: bool = True,
) -> dict[str, float]:
    """Train `unet` and `text_encoder` in place: DDPM noising, epsilon prediction.

    latents: posterior (mean, std), each [N, C, h, w], already multiplied by the VAE's
    scaling_factor; caption_ids: [N, L]; empty_ids: [L], the empty prompt. Returns final figures.
    """
    mean, std = latents
    noise_scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type="epsilon")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=True)
    schedule = get_scheduler(
        "cosine", optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps
    )
    unet.train()
    text_encoder.train()
    bar = tqdm(range(cfg.steps), desc="toy UNet + text encoder", disable=not progress, leave=False)
    loss_ema = None
    for _ in bar:
        idx = torch.randint(len(mean), (cfg.batch_size,), generator=generator)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)
        ids = caption_ids[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        ids[drop] = empty_ids

        noise = torch.randn(z0.shape, generator=generator)
        offset = torch.randn((*z0.shape[:2], 1, 1), generator=generator)  # [B, C, 1, 1]
        noise = noise + cfg.noise_offset * offset
        t = torch.randint(
            noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator
        )
        noisy = noise_scheduler.add_noise(z0, noise, t)

        text_states = text_encoder(ids)[0]  # [B, L, D], what SD's pipeline feeds the UNet
        pred = unet(noisy, t, encoder_hidden_states=text_states).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))  # [B]
        if cfg.loss_weighting == "v":
            # ||v_hat - v||^2 = ||eps_hat - eps||^2 / alpha_bar_t for an epsilon-predicting model
            weight = (1.0 / noise_scheduler.alphas_cumprod[t]).clamp(max=cfg.max_loss_weight)
            per_sample = weight * per_sample
        loss = per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.4f}")
    unet.eval()
    text_encoder.eval()
    return {"denoiser_loss": float(loss_ema)}


def check_config(cfg: ToyBaseConfig) -> None:
    """Raise a UserError for a config the toy base cannot be built from."""
    # 32x32 images and 3 VAE blocks give 8x8 latents; SD's pipeline also needs sizes % 8 == 0.
    factor = 2 ** (len(cfg.vae.block_out_channels) - 1 + len(cfg.unet.block_out_channels) - 1)
    if cfg.image_size % max(factor, 8):
        raise UserError(
            f"image_size={cfg.image_size}: must be a multiple of {max(factor, 8)} for these "
            "VAE and UNet blocks; use 32"
        )
    if not 0.0 <= cfg.unet.caption_dropout < 1.0:
        raise UserError(f"unet.caption_dropout={cfg.unet.caption_dropout}: must be in [0, 1)")
    if cfg.max_length < 2:
        raise UserError(f"max_length={cfg.max_length}: must be >= 2 (sot and eot tokens)")
    counts = {
        "n_images": cfg.n_images,
        "vae.steps": cfg.vae.steps,
        "vae.batch_size": cfg.vae.batch_size,
        "unet.steps": cfg.unet.steps,
        "unet.batch_size": cfg.unet.batch_size,
        "num_threads": cfg.num_threads,
    }
    for name, value in counts.items():
        if value < 1:
            raise UserError(f"{name}={value}: must be at least 1")


def train_toy_base(cfg: ToyBaseConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Train the toy base from `cfg.seed` and save it as a `StableDiffusionPipeline` at `out_dir`.

    The directory is written atomically; besides the pipeline it holds `toy_base.json` (the config
    and measured figures: final losses, latent scaling factor, seconds per phase). Same config,
    same weights.
    """
    check_config(cfg)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _train_and_save(cfg, Path(out_dir), progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train_and_save(cfg: ToyBaseConfig, out_dir: Path, progress: bool) -> Path:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = make_images(cfg.n_images, size=cfg.image_size, seed=cfg.seed)

    # Phase 1: the VAE, on pixels alone.
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.vae, cfg.image_size)
    metrics = train_vae(
        vae, data.images, cfg.vae, torch.Generator().manual_seed(cfg.seed + 1), progress
    )
    mean, std = encode_posteriors(vae, data.images)
    scale = latent_scaling_factor(mean, std, torch.Generator().manual_seed(cfg.seed + 2))
    vae.register_to_config(scaling_factor=scale)
    timings["vae_s"] = time.perf_counter() - start

    # Phase 2: text encoder + UNet on scaled latents and tokenised captions.
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = build_clip_tokenizer(tok_dir, model_max_length=cfg.max_length)
    caption_ids = tokenize(tokenizer, data.captions)  # [N, L]
    empty_ids = tokenize(tokenizer, [""])[0]  # [L]
    torch.manual_seed(cfg.seed + 3)
    text_encoder = build_text_encoder(cfg.text, cfg.max_length)
    latent_size = cfg.image_size // 2 ** (len(cfg.vae.block_out_channels) - 1)
    unet = build_unet(cfg.unet, latent_size, cfg.vae.latent_channels, cfg.text.hidden_size)
    phase2 = time.perf_counter()
    metrics |= train_denoiser(
        unet,
        text_encoder,
        (mean * scale, std * scale),
        caption_ids,
        empty_ids,
        cfg.unet,
        torch.Generator().manual_seed(cfg.seed + 4),
        progress,
    )
    timings["denoiser_s"] = time.perf_counter() - phase2

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        timings["total_s"] = time.perf_counter() - start
        write_json(
            tmp / "toy_base.json",
            {"config": to_dict(cfg), "scaling_factor": scale, "metrics": metrics | timings},
        )
    return out_dir
