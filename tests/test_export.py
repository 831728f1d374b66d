"""`plural-diffusion export`: where a fixed taste bakes into plain diffusers weights exactly, the
folder loads with `StableDiffusionPipeline.from_pretrained` and generates what the project
generates for that taste and seed; where it cannot, a one-line error says why."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from plural_diffusion.backbone import add_lora, load_pipeline
from plural_diffusion.cli import main as pd_main
from plural_diffusion.conditioning import TasteConditioner, TasteConditioningConfig
from plural_diffusion.export import EXPORT_JSON, plan_bake
from plural_diffusion.generate import Taste, generate_images
from plural_diffusion.policy import TastePolicy
from plural_diffusion.sampling import SamplingConfig
from reward_models.errors import UserError

PROMPT = "an image of one circle"
SEEDS = [3, 8]


def saved_policy(base, out, mode: str | None, experts: int = 0, lora_scale: float = 0.05):
    """A trained-looking policy (random LoRA, its B matrices at `lora_scale`, random taste
    module) saved as a checkpoint; mode None: taste-blind."""
    torch.manual_seed(0)
    pipe = load_pipeline(base)
    add_lora(pipe.unet, rank=2 * max(experts, 1), alpha=2 * max(experts, 1))
    conditioner = None
    if mode is not None:
        config = TasteConditioningConfig(mode=mode, taste_dim=8, hidden=16, experts=experts)
        conditioner = TasteConditioner.for_unet(config, pipe.unet)
        if experts:
            conditioner.set_experts(torch.randn(experts, 8))
        conditioner.attach(pipe.unet)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(lora_scale * torch.randn(p.shape))
        if conditioner is not None:
            conditioner.proj_out.weight.copy_(0.5 * torch.randn(conditioner.proj_out.weight.shape))
            conditioner.null.copy_(torch.randn(8))
    policy = TastePolicy(
        pipe,
        conditioner,
        sampling=SamplingConfig(steps=4, guidance_scale=3.0, eta=1.0),
        negative_prompt="a bright image",
        config={"base": str(base)},
    )
    policy.save_pretrained(out)
    return out


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        pd_main(argv)
    return e.value.code, capsys.readouterr()


def ours_and_plain_diffusers(checkpoint, exported) -> tuple[torch.Tensor, torch.Tensor]:
    """The project's images for the null taste and the exported folder's, same prompt and seeds,
    each with the sampler the policy was trained with."""
    policy = TastePolicy.from_pretrained(checkpoint=checkpoint)
    mean = [Taste("mean", "mean", None)]
    ours = generate_images(policy, [PROMPT], mean, SEEDS, policy.settings(), progress=False)
    record = json.loads((exported / EXPORT_JSON).read_text())["trained_sampler"]
    pipe = StableDiffusionPipeline.from_pretrained(exported, local_files_only=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(
        [PROMPT] * len(SEEDS),
        num_inference_steps=record["steps"],
        guidance_scale=record["guidance_scale"],
        eta=record["eta"],
        negative_prompt=[record["negative_prompt"]] * len(SEEDS),
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
        output_type="pt",
    ).images
    return ours[0, 0], plain


def test_a_taste_blind_policy_exports_exactly(toy_assets, tmp_path, capsys):
    # a LoRA large enough to move the images of any toy base (at 0.05 one machine's base
    # moved by 0.005 only)
    checkpoint = saved_policy(toy_assets.base, tmp_path / "ckpt", mode=None, lora_scale=0.3)
    code, printed = run(["export", "--checkpoint", str(checkpoint), str(tmp_path / "out")], capsys)
    assert code == 0, printed.err
    ours, plain = ours_and_plain_diffusers(checkpoint, tmp_path / "out")
    torch.testing.assert_close(plain, ours, rtol=0, atol=1e-5)
    # and the LoRA mattered: the base model draws other images
    base = TastePolicy.from_pretrained(toy_assets.base)
    settings = TastePolicy.from_pretrained(checkpoint=checkpoint).settings()
    mean = [Taste("mean", "mean", None)]
    unchanged = generate_images(base, [PROMPT], mean, SEEDS, settings, progress=False)[0, 0]
    assert (unchanged - ours).abs().max() > 0.01


def test_a_timestep_taste_with_experts_exports_exactly_for_the_null_taste(
    toy_assets, tmp_path, capsys
):
    checkpoint = saved_policy(toy_assets.base, tmp_path / "ckpt", mode="timestep", experts=3)
    code, printed = run(
        ["export", "--checkpoint", str(checkpoint), "--taste", "mean", str(tmp_path / "out")],
        capsys,
    )
    assert code == 0, printed.err
    ours, plain = ours_and_plain_diffusers(checkpoint, tmp_path / "out")
    torch.testing.assert_close(plain, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "mode, taste, message",
    [
        ("tokens", "mean", "through taste tokens in decoupled cross-attention"),
        ("timestep", "cluster:noir", "so only --taste mean exports exactly"),
        (None, "cluster:noir", "a taste-blind policy), so it cannot be exported for taste"),
    ],
)
def test_what_cannot_be_exact_is_refused_in_one_line(
    toy_assets, reward_run, tmp_path, capsys, mode, taste, message
):
    checkpoint = saved_policy(toy_assets.base, tmp_path / "ckpt", mode=mode)
    argv = ["export", "--checkpoint", str(checkpoint), "--taste", taste]
    code, printed = run([*argv, "--rewards", str(reward_run), str(tmp_path / "out")], capsys)
    assert code == 2
    assert message in printed.err and printed.err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_policy_trained_with_a_stochastic_window_is_refused_in_one_line(
    toy_assets, tmp_path, capsys
):
    checkpoint = saved_policy(toy_assets.base, tmp_path / "ckpt", mode=None)
    record = json.loads((checkpoint / "checkpoint.json").read_text())
    record["metadata"]["config"]["sampling"]["stochastic_steps"] = 2
    (checkpoint / "checkpoint.json").write_text(json.dumps(record))
    code, printed = run(["export", "--checkpoint", str(checkpoint), str(tmp_path / "out")], capsys)
    assert code == 2
    assert "in its first 2 of 4 steps only" in printed.err and printed.err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_untrained_taste_tokens_add_nothing_and_bake_for_any_taste():
    unet_width = 32
    config = TasteConditioningConfig(taste_dim=4, n_tokens=2, hidden=8, out_dim=unet_width)
    conditioner = TasteConditioner(config)  # zero-initialised output: all tokens are zero
    bake = plan_bake(conditioner, Taste("z", "z", torch.ones(4)), checkpoint="fresh")
    assert bake.gates is None and bake.time_offset is None
    with torch.no_grad():
        conditioner.proj_out.bias.fill_(0.1)  # trained: the tokens are no longer zero
    with pytest.raises(UserError, match="decoupled cross-attention"):
        plan_bake(conditioner, Taste("z", "z", torch.ones(4)), checkpoint="trained")
