"""A Stable Diffusion 1.5-shaped pipeline with random weights, built offline.

SD 1.5's architecture, module for module: a `UNet2DConditionModel` with down blocks
CrossAttnDownBlock2D x3 + DownBlock2D (and the mirrored up blocks), 768-wide cross-attention,
a 4-channel `AutoencoderKL` that downsamples 8x, a `CLIPTextModel` with ViT-L/14's text
config and OpenAI's CLIP tokenizer (written from open_clip's shipped BPE merges, see
`plural_diffusion.toyworld.tokenizer`). Saved with `StableDiffusionPipeline.save_pretrained`,
it loads exactly as a downloaded SD 1.5 does, so the trainer's SD 1.5 path is exercised with no
download: `SD15_FULL` for a GPU (the real sizes), `SD15_CPU` for tests (the same layout and
module names, narrower blocks, fewer text layers, 64 px images).

    python -m plural_diffusion.sd15_random OUT_DIR [--cpu]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from plural_diffusion.backbone import SD15_DOWN_BLOCKS, SD15_UP_BLOCKS
from plural_diffusion.toyworld.base import sd_ddim_scheduler
from plural_diffusion.toyworld.tokenizer import VOCAB_SIZE, build_clip_tokenizer
from reward_models.io import atomic_dir


@dataclass(frozen=True)
class SD15Size:
    """The sizes a random SD 1.5 is built at (the layout is always SD 1.5's)."""

    unet_widths: tuple[int, ...] = (320, 640, 1280, 1280)
    vae_widths: tuple[int, ...] = (128, 256, 512, 512)
    text_layers: int = 12  # ViT-L/14's text tower: width 768, 12 heads, MLP 3072
    sample_size: int = 64  # latent side: 512 px images


SD15_FULL = SD15Size()
# The CPU test's: widths / 10 (UNet) and / 4 (VAE), as the group norms (32 groups) allow,
# one text layer, 8x8 latents (64 px images).
SD15_CPU = SD15Size((32, 64, 128, 128), (32, 64, 128, 128), text_layers=1, sample_size=8)


def build_sd15_random(size: SD15Size = SD15_FULL, seed: int = 0) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` with SD 1.5's architecture and random (seeded) weights."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=size.sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=SD15_DOWN_BLOCKS,
        up_block_types=SD15_UP_BLOCKS,
        block_out_channels=size.unet_widths,
        layers_per_block=2,
        attention_head_dim=8,  # diffusers' name for SD 1.5's 8 heads per block
        cross_attention_dim=768,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=size.vae_widths,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=size.sample_size * 8,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=size.text_layers,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = build_clip_tokenizer(tok_dir, model_max_length=77)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=sd_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_sd15_random(out_dir: str | os.PathLike, size: SD15Size = SD15_FULL, seed=0) -> Path:
    """Build a random SD 1.5 and save it as a diffusers pipeline directory (atomically)."""
    out_dir = Path(out_dir)
    pipe = build_sd15_random(size, seed)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cpu", action="store_true", help="the CPU test's narrow sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    save_sd15_random(args.out, SD15_CPU if args.cpu else SD15_FULL, args.seed)
    print(f"random SD 1.5 ({'cpu' if args.cpu else 'full'} sizes) in {args.out}")


if __name__ == "__main__":
    main()
