"""Backbone: local pipeline loading, LoRA-only training, LoRA checkpoints diffusers can read."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from plural_diffusion.backbone import (
    add_lora,
    disable_adapters,
    load_checkpoint,
    load_pipeline,
    save_checkpoint,
    trainable_parameters,
)
from plural_diffusion.conditioning import TasteConditioner, TasteConditioningConfig, unet_forward
from plural_diffusion.toyworld.tokenizer import build_clip_tokenizer
from reward_models.errors import UserError


def tiny_unet(cross_attention_dim: int = 32, swap_blocks: bool = False) -> UNet2DConditionModel:
    """Cross-attention in down block 0, the mid block and up block 1 (4 transformer blocks);
    `swap_blocks` moves it to down block 1 / up block 0: same widths, other layer names."""
    torch.manual_seed(0)
    down = ("CrossAttnDownBlock2D", "DownBlock2D")
    up = ("UpBlock2D", "CrossAttnUpBlock2D")
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=down[::-1] if swap_blocks else down,
        up_block_types=up[::-1] if swap_blocks else up,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A complete tiny SD pipeline directory written by `save_pretrained` (16x16 images)."""
    root = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(root / "tokenizer_src", model_max_length=8),
        unet=tiny_unet(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 7, 32, generator=g)
    return latents, torch.tensor([981, 41]), text, torch.randn(2, 5, generator=g)


def test_local_directory_loads_offline_with_a_ddim_scheduler_and_generates(base_dir, monkeypatch):
    calls = []
    original = StableDiffusionPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(spy))
    pipe = load_pipeline(base_dir, dtype="fp32", device="cpu")
    assert calls[0]["local_files_only"] is True
    assert type(pipe.scheduler) is DDIMScheduler
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.beta_end == 0.012
    assert pipe.safety_checker is None
    images = pipe(
        ["a dark vivid warm image"], num_inference_steps=2, output_type="pt", height=16, width=16
    ).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_missing_or_wrong_local_paths_are_one_line_user_errors(tmp_path):
    for missing in [str(tmp_path / "no_such_base"), "./models/base-v1"]:
        with pytest.raises(UserError, match="base model directory not found") as err:
            load_pipeline(missing)
        assert "\n" not in str(err.value) and missing in str(err.value)
    with pytest.raises(UserError, match="no model_index.json"):
        load_pipeline(tmp_path)


def test_add_lora_makes_only_lora_and_conditioner_trainable_and_keeps_the_output(base_dir):
    pipe = load_pipeline(base_dir, dtype="bf16")
    unet = pipe.unet
    latents, t, text, _ = inputs()
    with torch.no_grad():
        base = unet(latents.bfloat16(), t, encoder_hidden_states=text.bfloat16()).sample
    add_lora(unet, rank=2, alpha=6.0)
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # r * (in + out) summed over to_q/k/v/out.0 of 4 transformer blocks: 2 * 2496
    assert sum(p.numel() for p in trainable.values()) == 4992
    assert all(p.dtype == torch.float32 for p in trainable.values())  # LoRA in fp32, base in bf16
    frozen = [p for n, p in unet.named_parameters() if n not in trainable]
    assert all(p.dtype == torch.bfloat16 for p in frozen)

    conditioner = TasteConditioner.for_unet(TasteConditioningConfig(taste_dim=5, hidden=8), unet)
    params = trainable_parameters(unet, conditioner)
    assert len(params) == len(trainable) + len(list(conditioner.parameters()))
    with torch.no_grad():  # lora_B starts at zero: the adapted UNet is the base UNet
        adapted = unet(latents.bfloat16(), t, encoder_hidden_states=text.bfloat16()).sample
    torch.testing.assert_close(adapted, base, atol=0, rtol=0)


def perturb_lora(unet: UNet2DConditionModel, scale: float = 0.2) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, scale)


def test_disable_adapters_runs_the_base_model_and_then_restores_lora():
    unet = tiny_unet()
    latents, t, text, _ = inputs(1)
    with torch.no_grad():
        base = unet(latents, t, encoder_hidden_states=text).sample
        add_lora(unet, rank=2, alpha=2.0)
        perturb_lora(unet)
        adapted = unet(latents, t, encoder_hidden_states=text).sample
        with disable_adapters(unet):
            reference = unet(latents, t, encoder_hidden_states=text).sample
        again = unet(latents, t, encoder_hidden_states=text).sample
    assert (adapted - base).abs().max() > 1e-2
    torch.testing.assert_close(reference, base, atol=1e-6, rtol=0)
    torch.testing.assert_close(again, adapted, atol=0, rtol=0)


def test_checkpoint_written_after_training_loads_into_a_fresh_base_with_diffusers(
    base_dir, tmp_path
):
    # alpha != rank on purpose: a loader that drops alpha would rescale the LoRA silently
    pipe = load_pipeline(base_dir)
    unet = pipe.unet
    conditioner = TasteConditioner.for_unet(
        TasteConditioningConfig(taste_dim=5, n_tokens=2, hidden=8), unet
    )
    conditioner.attach(unet)
    add_lora(unet, rank=2, alpha=6.0)
    latents, t, text, z = inputs(2)
    with torch.no_grad():
        base = unet_forward(unet, None, latents, t, text, None)
    optimizer = torch.optim.Adam(trainable_parameters(unet, conditioner), lr=1e-2)
    loss = ((unet_forward(unet, conditioner, latents, t, text, z) - 1.0) ** 2).mean()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        trained_lora = unet_forward(unet, None, latents, t, text, None)  # LoRA on, no taste
        trained = unet_forward(unet, conditioner, latents, t, text, z)
    assert (trained_lora - base).abs().max() > 1e-3
    assert (trained - trained_lora).abs().max() > 1e-4

    ckpt = save_checkpoint(tmp_path / "step-1", unet, conditioner, metadata={"step": 1})
    # plain diffusers reads the LoRA into a fresh base pipeline
    fresh = load_pipeline(base_dir)
    fresh.load_lora_weights(ckpt)
    with torch.no_grad():
        loaded = fresh.unet(latents, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(loaded, trained_lora, atol=1e-5, rtol=1e-5)
    assert (loaded - base).abs().max() > 1e-3

    # our loader restores LoRA + taste conditioner, trainable again
    resumed = load_pipeline(base_dir).unet
    _, resumed_conditioner = load_checkpoint(ckpt, resumed)
    resumed_conditioner.attach(resumed)
    with torch.no_grad():
        again = unet_forward(resumed, resumed_conditioner, latents, t, text, z)
    torch.testing.assert_close(again, trained, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in resumed.parameters() if p.requires_grad) == 4992


def test_incompatible_lora_checkpoints_are_user_errors(tmp_path):
    unet = tiny_unet()
    add_lora(unet, rank=2, alpha=4.0)
    perturb_lora(unet)
    ckpt = save_checkpoint(tmp_path / "ckpt", unet)

    other_rank = add_lora(tiny_unet(), rank=4, alpha=8.0)  # same alpha/rank, other shapes
    with pytest.raises(UserError, match="another rank"):
        load_checkpoint(ckpt, other_rank)
    with pytest.raises(UserError, match="alpha/rank 4.0/2 differs"):
        load_checkpoint(ckpt, add_lora(tiny_unet(), rank=2, alpha=2.0))
    with pytest.raises(UserError, match="another rank or another base model"):
        load_checkpoint(ckpt, tiny_unet(cross_attention_dim=16))
    # same widths, attention in other blocks: diffusers' load_lora_weights only warns here and
    # leaves most layers at the base weights; we refuse
    with pytest.raises(UserError, match="another base model"):
        load_checkpoint(ckpt, tiny_unet(swap_blocks=True))
    with pytest.raises(UserError, match="checkpoint.json: file not found"):
        load_checkpoint(tmp_path / "nowhere", tiny_unet())


def test_saving_again_replaces_the_checkpoint_atomically(tmp_path):
    unet = add_lora(tiny_unet(), rank=2, alpha=2.0)
    save_checkpoint(tmp_path / "latest", unet, metadata={"step": 1})
    perturb_lora(unet, scale=0.5)
    save_checkpoint(tmp_path / "latest", unet, metadata={"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no temp or old dirs left
    resumed, conditioner = load_checkpoint(tmp_path / "latest", tiny_unet())
    assert conditioner is None
    latents, t, text, _ = inputs(4)
    with torch.no_grad():
        torch.testing.assert_close(
            resumed(latents, t, encoder_hidden_states=text).sample,
            unet(latents, t, encoder_hidden_states=text).sample,
        )


def test_unwrap_peels_compile_and_data_parallel_wrappers_without_walking_modules(monkeypatch):
    from torch import nn

    from plural_diffusion.unwrap import unwrap

    inner = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    monkeypatch.setattr(nn.Module, "named_modules", lambda *a, **k: pytest.fail("walked"))
    assert unwrap(inner) is inner
    assert unwrap(torch.compile(inner)) is inner
    assert unwrap(nn.DataParallel(torch.compile(inner))) is inner
