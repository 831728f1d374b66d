"""TastePolicy: one object holds the pipeline with its LoRA, the taste conditioner and the sampler
it was trained with; it round-trips through save_pretrained / from_pretrained, swaps a run's
checkpoints in place, and samples with the trained negative prompt."""

from __future__ import annotations

import pytest
import torch

from plural_diffusion.backbone import add_lora, load_pipeline
from plural_diffusion.conditioning import TasteConditioner, TasteConditioningConfig
from plural_diffusion.generate import Taste, generate_images
from plural_diffusion.policy import (
    CheckpointInfo,
    SamplingOverrides,
    TastePolicy,
    TrainedSampler,
    resolve_settings,
)
from plural_diffusion.sampling import SamplingConfig
from reward_models.errors import UserError

PROMPT = "an image of one circle"
TRAINED = SamplingConfig(steps=3, guidance_scale=3.0, eta=1.0)


def trained_policy(base, seed: int = 0, conditioned: bool = True) -> TastePolicy:
    """A policy as the trainer holds one: loaded parts, random LoRA and taste module weights."""
    torch.manual_seed(seed)
    pipe = load_pipeline(base)
    add_lora(pipe.unet, rank=2, alpha=2)
    conditioner = None
    if conditioned:
        config = TasteConditioningConfig(taste_dim=8, n_tokens=2, hidden=16)
        conditioner = TasteConditioner.for_unet(config, pipe.unet)
        conditioner.attach(pipe.unet)
    with torch.no_grad():  # a trained policy: B and the taste projection are no longer zero
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape))
        if conditioner is not None:
            conditioner.proj_out.weight.copy_(0.5 * torch.randn(conditioner.proj_out.weight.shape))
    return TastePolicy(
        pipe,
        conditioner,
        sampling=TRAINED,
        negative_prompt="a bright image",
        taste_names=["noir", "sunny"] if conditioned else ["none"],
        config={"base": str(base), "objective": "matched" if conditioned else "mean"},
    )


def images(policy: TastePolicy, tastes, overrides=None, seeds=(1, 2)) -> torch.Tensor:
    settings = policy.settings(overrides)
    return generate_images(policy, [PROMPT], tastes, list(seeds), settings, progress=False)


NOIR = Taste("noir", "cluster:noir", torch.linspace(-1, 1, 8))


def test_a_saved_policy_loads_with_its_trained_sampler_and_generates_the_same_images(
    toy_assets, tmp_path
):
    policy = trained_policy(toy_assets.base)
    before = images(policy, [NOIR, Taste("mean", "mean", None)])
    policy.save_pretrained(tmp_path / "ckpt", metadata={"epoch": 3})

    info = CheckpointInfo.read(tmp_path / "ckpt")
    assert info.trained == TrainedSampler(TRAINED, "a bright image")
    assert info.taste_names == ["noir", "sunny"] and info.conditioned
    assert info.config["base"] == str(toy_assets.base)

    loaded = TastePolicy.from_pretrained(checkpoint=tmp_path / "ckpt")  # base: the trained one
    assert loaded.sampling == TRAINED and loaded.negative_prompt == "a bright image"
    settings = loaded.settings()
    assert settings.sampling == TRAINED and set(settings.source.values()) == {"checkpoint"}
    after = images(loaded, [NOIR, Taste("mean", "mean", None)])
    torch.testing.assert_close(after, before)


def test_generation_uses_the_trained_negative_prompt(toy_assets):
    policy = trained_policy(toy_assets.base, conditioned=False)
    mean = [Taste("mean", "mean", None)]
    trained = images(policy, mean)
    empty = images(policy, mean, SamplingOverrides(negative_prompt=""))
    assert (trained - empty).abs().max() > 0.05
    assert (
        policy.settings(SamplingOverrides(negative_prompt="")).source["negative_prompt"] == "user"
    )


def test_swapping_checkpoints_in_place_equals_loading_each_afresh(toy_assets, tmp_path):
    for seed in (0, 1):
        trained_policy(toy_assets.base, seed=seed).save_pretrained(tmp_path / f"epoch-{seed}")
    policy = TastePolicy.from_pretrained(checkpoint=tmp_path / "epoch-0")
    first = images(policy, [NOIR])
    policy.load_checkpoint(tmp_path / "epoch-1")
    swapped = images(policy, [NOIR])
    fresh = images(TastePolicy.from_pretrained(checkpoint=tmp_path / "epoch-1"), [NOIR])
    torch.testing.assert_close(swapped, fresh)
    assert (swapped - first).abs().max() > 1e-3

    trained_policy(toy_assets.base, conditioned=False).save_pretrained(tmp_path / "blind")
    with pytest.raises(UserError, match="taste-blind checkpoints cannot share a pipeline"):
        policy.load_checkpoint(tmp_path / "blind")


def test_the_base_model_has_no_trained_sampler_and_a_blind_policy_takes_no_taste(
    toy_assets, tmp_path
):
    base = TastePolicy.from_pretrained(toy_assets.base)
    assert base.sampling is None and base.conditioner is None
    assert base.settings().sampling == SamplingConfig()  # the defaults
    assert set(base.settings().source.values()) == {"default"}
    with pytest.raises(UserError, match="a taste-blind policy .* cannot be asked for a taste"):
        base.sample(prompts=[PROMPT], tastes=torch.zeros(1, 8))


def test_overrides_replace_only_the_values_given():
    trained = TrainedSampler(TRAINED, "blurry")
    settings = resolve_settings(SamplingOverrides(steps=7), trained, "checkpoint mean")
    assert settings.sampling == SamplingConfig(steps=7, guidance_scale=3.0, eta=1.0)
    assert settings.negative_prompt == "blurry"
    assert settings.source == {
        "steps": "user",
        "guidance": "checkpoint mean",
        "eta": "checkpoint mean",
        "stochastic_steps": "checkpoint mean",
        "negative_prompt": "checkpoint mean",
    }
    with pytest.raises(UserError, match="--eta 2.0: must be in"):
        resolve_settings(SamplingOverrides(eta=2.0), trained)
