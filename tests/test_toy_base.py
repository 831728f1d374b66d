"""The toy base is a real, text-conditioned Stable Diffusion pipeline trained by our code."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file
from transformers import CLIPTextModel

from plural_diffusion.toyworld.base import (
    ToyBaseConfig,
    build_text_encoder,
    build_unet,
    train_toy_base,
)
from plural_diffusion.toyworld.raters import pixel_stats
from plural_diffusion.toyworld.vae import build_vae
from reward_models.config import load_config
from reward_models.errors import UserError

# Small but adequate: quick on one CPU core, and prompts already steer brightness (the
# dark-vs-bright luma gap measured 0.25-0.28 for seeds 0, 1 and 2; 0.15 with 120 VAE steps).
SMALL = [
    "n_images=512",
    "max_length=16",
    "text.hidden_size=32",
    "text.intermediate_size=64",
    "vae.steps=200",
    "unet.steps=200",
    "unet.batch_size=16",
]
# Only for checks that do not need a working model.
TINY = [
    "n_images=16",
    "max_length=8",
    "text.hidden_size=16",
    "text.intermediate_size=32",
    "vae.steps=2",
    "vae.batch_size=4",
    "unet.steps=2",
    "unet.batch_size=4",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Sampling in the tests on one thread too: two OpenMP threads on a busy 2-core box crawl.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "toy-base"
    train_toy_base(load_config(ToyBaseConfig, None, SMALL), out, progress=False)
    return out


@pytest.fixture(scope="module")
def small_pipe(small_base) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(small_base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_images(pipe, prompt: str, n: int, steps: int = 10, guidance: float = 4.0, seed: int = 0):
    """[n, 3, 32, 32] images in [0, 1], from the pipeline diffusers itself runs."""
    return pipe(
        [prompt] * n,
        height=32,
        width=32,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


def test_default_models_map_32px_images_to_4x8x8_latents_and_read_text_in_every_block():
    cfg = ToyBaseConfig()
    torch.manual_seed(0)
    vae = build_vae(cfg.vae, cfg.image_size)
    latents = vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latent_dist.mean
    assert latents.shape == (2, 4, 8, 8)
    assert vae.decode(latents).sample.shape == (2, 3, 32, 32)
    text_encoder = build_text_encoder(cfg.text, cfg.max_length)
    assert text_encoder.config.vocab_size == 49408
    assert text_encoder.config.max_position_embeddings == cfg.max_length == 32
    unet = build_unet(cfg.unet, 8, 4, cfg.text.hidden_size)
    assert all(b.startswith("CrossAttn") for b in unet.config.down_block_types)
    assert all(b.startswith("CrossAttn") for b in unet.config.up_block_types)
    assert unet.config.cross_attention_dim == cfg.text.hidden_size


def test_saved_directory_loads_as_stable_diffusion_with_sd_ddim_settings(small_base, small_pipe):
    assert not list(small_base.parent.glob(".*.tmp"))  # atomic write left nothing behind
    pipe = small_pipe
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    sched = pipe.scheduler.config
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == (
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert (sched.steps_offset, sched.set_alpha_to_one, sched.clip_sample) == (1, False, False)
    assert sched.prediction_type == "epsilon"
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 16
    # scaling_factor was measured: the UNet's training latents have unit std
    meta = json.loads((small_base / "toy_base.json").read_text())
    assert pipe.vae.config.scaling_factor == pytest.approx(meta["scaling_factor"])
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)
    assert meta["config"]["unet"]["steps"] == 200


def test_pipeline_samples_32px_images_in_unit_range(small_pipe):
    images = pipe_images(small_pipe, "a bright vivid warm image of one circle", n=2, steps=4)
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    # not a constant: the decoder draws something
    assert images.std() > 0.01
    pil = small_pipe(["a dark image"], height=32, width=32, num_inference_steps=2).images
    assert pil[0].size == (32, 32)


def test_dark_prompts_give_darker_images_than_bright_prompts(small_pipe):
    dark = pixel_stats(pipe_images(small_pipe, "a dark muted warm image of one circle", n=8))
    bright = pixel_stats(pipe_images(small_pipe, "a bright muted warm image of one circle", n=8))
    dark_luma, bright_luma = dark[:, 0].mean().item(), bright[:, 0].mean().item()
    # measured with this config: 0.18 vs 0.44
    assert bright_luma - dark_luma > 0.12, (dark_luma, bright_luma)
    assert (dark[:, 0] < bright[:, 0].median()).float().mean() >= 0.75


def test_the_unet_reads_the_prompt_through_cross_attention(small_pipe):
    # Same noisy latents and timestep, two prompts' hidden states: different noise predictions.
    pipe = small_pipe
    ids = pipe.tokenizer(
        ["a dark image", "a bright image"],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]  # [2, L, D]
        noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).repeat(
            2, 1, 1, 1
        )
        eps = pipe.unet(noisy, torch.tensor([800, 800]), encoder_hidden_states=states).sample
    assert (eps[0] - eps[1]).abs().mean() > 1e-3


def test_same_seed_gives_the_same_weights_and_another_seed_does_not(tmp_path):
    def weights(seed: int, name: str) -> dict[str, torch.Tensor]:
        cfg = load_config(ToyBaseConfig, None, [*TINY, f"seed={seed}"])
        out = train_toy_base(cfg, tmp_path / name, progress=False)
        return {
            f"{part}/{k}": v
            for part in ("vae", "unet", "text_encoder")
            for k, v in load_file(next((out / part).glob("*.safetensors"))).items()
        }

    first, again, other = weights(7, "a"), weights(7, "b"), weights(8, "c")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize(
    "override, message",
    [
        ("image_size=30", "image_size=30"),
        ("unet.caption_dropout=1.0", "caption_dropout"),
        ("max_length=1", "max_length=1"),
        ("unet.steps=0", "unet.steps=0"),
    ],
)
def test_impossible_configs_are_user_errors(tmp_path, override, message):
    cfg = load_config(ToyBaseConfig, None, [*TINY, override])
    with pytest.raises(UserError, match=message):
        train_toy_base(cfg, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
