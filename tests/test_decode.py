"""Decoding for reward backpropagation: values clamped to [0, 1], gradient never cut by the clamp."""

import torch
from diffusers import AutoencoderKL

from plural_diffusion.sampling import decode_images


def test_a_blown_out_image_still_passes_the_rewards_gradient():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(5.0)  # a decoder whose images are all blown out
    latents = torch.randn(2, 4, 4, 4, requires_grad=True)
    images = decode_images(vae, latents)
    assert (images == 1).all()
    images.mean().backward()  # "darker" would be a reward's wish for these pixels
    assert latents.grad.abs().sum() > 0
