"""`plural-diffusion export`: a policy for one fixed taste as a plain diffusers pipeline folder,
written only where plain diffusers computes exactly what the project computes.

`StableDiffusionPipeline.from_pretrained(OUT)` loads the folder with no code from this project:
the base weights with the LoRA merged in, and the DDIM scheduler; the trained steps, guidance,
eta and negative prompt are in `OUT/plural_diffusion_export.json` (eta and the negative prompt
are arguments of the pipeline call, not of its config).

What a plain pipeline can run, per part of a policy (CFG = classifier-free guidance, whose
unconditional half gets the null taste and whose conditional half gets the asked taste):

    LoRA                        merged into the UNet's weights: exact.
    LoRA experts                routed by the asked taste in *both* CFG halves, so for a fixed
                                taste they are one LoRA with A's rows scaled by the taste's
                                gates (`experts.bake_gate`): exact for any taste.
    taste tokens ("tokens")     a second softmax over the taste tokens in every cross-attention
                                (decoupled cross-attention): plain attention processors cannot
                                run it, and its output depends on the image, so it cannot be
                                folded into weights. Exact only when the tokens of both halves
                                are all zero (an untrained taste module).
    timestep embedding          a constant added to the timestep embedding, which folds into
      ("timestep")              `time_embedding.linear_2.bias`; but one plain UNet runs both
                                CFG halves with the same weights, so it is exact only when the
                                asked taste's embedding equals the null taste's: `--taste mean`.

A taste-blind policy (objective mean or maxmin) is its LoRA alone and exports exactly, unless
it was trained with DDPO's stochastic window (noise in its first steps only, `SamplingConfig.
stochastic_steps`): a plain pipeline's eta applies to every step. Anything else is refused
with a one-line reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from plural_diffusion.backbone import ADAPTER, TASTE_DIR, load_checkpoint, load_pipeline
from plural_diffusion.conditioning import TasteConditioner, load_taste_conditioner
from plural_diffusion.experts import bake_gate
from plural_diffusion.generate import NULL_SPECS, Taste, resolve_taste
from plural_diffusion.policy import CheckpointInfo
from reward_models.config import to_dict
from reward_models.errors import UserError
from reward_models.io import atomic_dir, write_json

EXPORT_JSON = "plural_diffusion_export.json"
SUPPORTED = (
    "export supports taste-blind policies (objective mean or maxmin) and, for "
    "conditioning.mode=timestep, --taste mean"
)


@dataclass
class Bake:
    """What one fixed taste adds to a plain UNet: expert gates [E] (None: no experts) and a
    timestep-embedding offset [D] (None: nothing to add)."""

    gates: torch.Tensor | None
    time_offset: torch.Tensor | None


@torch.no_grad()
def plan_bake(conditioner: TasteConditioner | None, taste: Taste, checkpoint: Path) -> Bake:
    """How taste `taste` bakes into plain diffusers weights exactly, or a UserError naming why
    it cannot (see the module docstring)."""
    if conditioner is None:
        return Bake(None, None)
    cfg = conditioner.config
    null = conditioner.null[None]  # [1, d]
    asked = null if taste.z is None else taste.z.to(null)[None]
    uncond, cond = conditioner(null)[0], conditioner(asked)[0]
    if cfg.mode == "tokens":
        if bool(uncond.any()) or bool(cond.any()):
            raise UserError(
                f"checkpoint {checkpoint} feeds the taste through taste tokens in decoupled "
                "cross-attention, which plain diffusers attention processors cannot run; "
                f"{SUPPORTED}"
            )
        offset = None  # all-zero tokens add exactly nothing
    else:
        if not torch.equal(uncond, cond):
            raise UserError(
                f"checkpoint {checkpoint} adds the taste to the timestep embedding, and "
                "classifier-free guidance gives the unconditional half the null taste: a plain "
                "pipeline runs both halves with one set of weights, so only --taste mean "
                "exports exactly"
            )
        offset = cond
    gates = conditioner.gates(asked, 1)[0] if cfg.experts else None
    return Bake(gates, offset)


def export_diffusers(
    checkpoint: str | Path,
    out_dir: str | Path,
    taste_spec: str = "mean",
    rewards_dir: str | Path | None = None,
    base: str | None = None,
    device: str = "cpu",
) -> Path:
    """Write a folder `StableDiffusionPipeline.from_pretrained` loads that generates what the
    policy at `checkpoint` generates for taste `taste_spec` (see the module docstring)."""
    info = CheckpointInfo.read(checkpoint)
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / EXPORT_JSON).is_file():
        raise UserError(f"{out_dir}: exists and is not an earlier export; choose a new folder")
    base = base or info.config.get("base")
    if not base:
        raise UserError("no base model: pass --base DIR_OR_HUB_ID")
    sampler = None if info.trained is None else info.trained.sampling
    if sampler is not None and 0 < sampler.stochastic_steps < sampler.steps:
        raise UserError(
            f"checkpoint {info.path} was trained to draw noise in its first "
            f"{sampler.stochastic_steps} of {sampler.steps} steps only (DDPO's stochastic window), "
            "which a plain diffusers pipeline cannot run (its eta applies to every step); "
            "generate with plural-diffusion generate"
        )
    conditioner = load_taste_conditioner(info.path / TASTE_DIR) if info.conditioned else None
    # refuse what cannot be exact before asking for the reward run a taste would need
    if conditioner is None and taste_spec.strip() not in NULL_SPECS:
        raise UserError(
            f"checkpoint {info.path} has no taste conditioner (a taste-blind policy), so it "
            f"cannot be exported for taste {taste_spec!r}; use --taste mean"
        )
    if conditioner is not None and conditioner.config.mode == "tokens":
        plan_bake(conditioner, Taste("mean", "mean", None), info.path)
    taste = _resolve(taste_spec, rewards_dir, info)
    bake = plan_bake(conditioner, taste, info.path)

    pipe = load_pipeline(base, device=device)
    unet = pipe.unet
    load_checkpoint(info.path, unet)  # the LoRA as trained; the conditioner stays unattached
    if bake.gates is not None:
        rank = unet.peft_config[ADAPTER].r // len(bake.gates)  # per expert
        state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
        set_peft_model_state_dict(unet, bake_gate(state, bake.gates, rank), adapter_name=ADAPTER)
    unet.fuse_lora()
    unet.unload_lora()
    if bake.time_offset is not None:
        with torch.no_grad():
            bias = unet.time_embedding.linear_2.bias
            bias += bake.time_offset.to(bias)
    trained = info.trained
    record = {
        "checkpoint": str(info.path),
        "base": str(base),
        "taste": {
            "label": taste.label,
            "spec": taste.spec,
            "z": None if taste.z is None else taste.z.tolist(),
        },
        "trained_sampler": None
        if trained is None
        else {**to_dict(trained.sampling), "negative_prompt": trained.negative_prompt},
        "usage": (
            "pipe = StableDiffusionPipeline.from_pretrained(OUT); pipe(prompt, "
            "num_inference_steps=steps, guidance_scale=guidance_scale, eta=eta, "
            "negative_prompt=negative_prompt) with the trained_sampler values"
        ),
    }
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp)
        write_json(tmp / EXPORT_JSON, record)
    return out_dir


def _resolve(spec: str, rewards_dir, info: CheckpointInfo) -> Taste:
    if spec.strip() in NULL_SPECS:
        return resolve_taste(spec)
    from plural_diffusion.rewards import TasteRewards

    rewards_dir = rewards_dir or info.config.get("rewards")
    if not rewards_dir or not Path(rewards_dir).exists():
        raise UserError(f"taste {spec!r} needs the reward run: pass --rewards RUN_DIR")
    return resolve_taste(spec, TasteRewards(str(rewards_dir), space=info.taste_space))
