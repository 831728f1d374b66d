"""The prepared toy base is a real diffusers Stable Diffusion pipeline that follows its prompt."""

import json

import torch
from diffusers import StableDiffusionPipeline

from plural_diffusion.cache import verify
from plural_diffusion.toyworld.raters import pixel_stats


def generate(pipe, prompt, n=8, seed=0):
    return pipe(
        [prompt] * n,
        height=32,
        width=32,
        num_inference_steps=15,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


def test_toy_base_loads_with_plain_diffusers_and_obeys_brightness_words(toy_assets):
    assert verify(toy_assets.base) is None  # a complete, checksummed stage
    index = json.loads((toy_assets.base / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    pipe = StableDiffusionPipeline.from_pretrained(toy_assets.base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    dark = generate(pipe, "a dark grey image of one circle")
    bright = generate(pipe, "a bright grey image of one circle")
    assert dark.shape == (8, 3, 32, 32) and dark.min() >= 0 and dark.max() <= 1
    luma_dark = pixel_stats(dark)[:, 0].mean().item()
    luma_bright = pixel_stats(bright)[:, 0].mean().item()
    # measured 0.11 on this smoke-sized base (0.53 on the demo's full-sized one)
    assert luma_bright - luma_dark > 0.07, (luma_dark, luma_bright)


def test_toy_prepare_reuses_its_cache(fast_demo_config, toy_assets, monkeypatch):
    from plural_diffusion.toyworld import prepare

    def must_not_build(*args, **kwargs):
        raise AssertionError("a cached toy stage was built again")

    for builder in ("write_world", "train_toy_clip", "train_toy_base"):
        monkeypatch.setattr(prepare, builder, must_not_build)
    again = prepare.prepare_toy(fast_demo_config.prepare, progress=False)
    assert (again.world, again.clip, again.base) == (
        toy_assets.world,
        toy_assets.clip,
        toy_assets.base,
    )
