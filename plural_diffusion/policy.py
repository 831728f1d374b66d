"""A trained policy as one object: the pipeline with its LoRA, the taste conditioner, and the
settings it was trained with.

    policy = TastePolicy.from_pretrained(base, "runs/matched/checkpoints/epoch-0012")
    traj = policy.sample(prompts=["an image of one circle"] * 2, tastes=z)   # z [2, d]
    policy.load_checkpoint("runs/matched/checkpoints/epoch-0008")             # same pipeline

What a checkpoint is (one directory, written by `save_pretrained` or the trainer):

    checkpoint.json                    {"lora": {rank, alpha, target_modules},
                                        "metadata": {"config": the trainer's whole config,
                                                     "taste_space": "rater" | "latent",
                                                     "tastes": names of the trained tastes,
                                                     "epoch", "objective", ...}}
    pytorch_lora_weights.safetensors   the LoRA, in the format diffusers' load_lora_weights reads
    taste_conditioner/                 only for a taste-conditioned policy (objective=matched)

The sampler a policy was trained with (DDIM steps, guidance scale, eta, negative prompt) is read
from metadata["config"]: a policy generates with it unless the caller overrides a value
(`SamplingOverrides`), and every output says which values came from where (`SamplerSettings`).
The base model has no trained settings; it uses the defaults, or those of the policy it is
compared with. The low-level LoRA and checkpoint files are `plural_diffusion.backbone`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from plural_diffusion.backbone import (
    CHECKPOINT_JSON,
    TASTE_DIR,
    load_checkpoint,
    load_pipeline,
    save_checkpoint,
)
from plural_diffusion.conditioning import TasteConditioner
from plural_diffusion.sampling import SamplingConfig, Trajectory, sample
from reward_models.config import from_dict, to_dict
from reward_models.errors import UserError
from reward_models.io import read_json


# --------------------------------------------------------------------------------- checkpoints
def policy_dir(path: str | Path) -> Path:
    """The checkpoint directory a user named: a `policy/` dir, or a dir holding one (a
    trainer's `checkpoints/epoch-0012`, a demo policy stage)."""
    path = Path(path)
    if (path / CHECKPOINT_JSON).is_file():
        return path
    if (path / "policy" / CHECKPOINT_JSON).is_file():
        return path / "policy"
    if not path.exists():
        raise UserError(f"{path}: checkpoint directory not found")
    raise UserError(
        f"{path}: not a policy checkpoint (no {CHECKPOINT_JSON} in it or in policy/); point at "
        "RUN/checkpoints/epoch-NNNN from `plural-diffusion train`"
    )


@dataclass
class TrainedSampler:
    """The sampler a policy was trained with."""

    sampling: SamplingConfig
    negative_prompt: str = ""


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself, read from checkpoint.json without loading weights."""

    path: Path
    config: dict  # the trainer's whole config ({} when none was stored)
    taste_space: str  # the space of the tastes the conditioner reads: "rater" or "latent"
    taste_names: list[str]  # the tastes it was trained on (cluster names, rater ids, or "none")
    conditioned: bool  # has a taste conditioner
    trained: TrainedSampler | None  # None when the config names no sampler
    # with `select_experts`: each taste's LoRA expert block came from this checkpoint
    experts_from: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> CheckpointInfo:
        path = policy_dir(path)
        meta = read_json(path / CHECKPOINT_JSON).get("metadata", {})
        meta = meta if isinstance(meta, dict) else {}
        config = meta.get("config") or {}
        trained = None
        if "sampling" in config:
            trained = TrainedSampler(
                from_dict(SamplingConfig, config["sampling"]), config.get("negative_prompt", "")
            )
        return cls(
            path=path,
            config=config,
            taste_space=meta.get("taste_space", "rater"),
            taste_names=list(meta.get("tastes", [])),
            conditioned=(path / TASTE_DIR).is_dir(),
            trained=trained,
            experts_from=dict(meta.get("experts_from") or {}),
        )


# --------------------------------------------------------------------------------- settings
@dataclass
class SamplingOverrides:
    """Sampler values a user asks for; None keeps the policy's trained value."""

    steps: int | None = None
    guidance_scale: float | None = None
    eta: float | None = None
    negative_prompt: str | None = None

    def check(self) -> SamplingOverrides:
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps {self.steps}: must be >= 1")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise UserError(f"--eta {self.eta}: must be in [0, 1]")
        return self


@dataclass
class SamplerSettings:
    """The sampler a policy generates with, and where each value came from: "checkpoint" (the
    policy's trained value), "user", "default" (no trained value), or "checkpoint NAME" (the
    trained value of policy NAME, for the base model compared with it)."""

    sampling: SamplingConfig
    negative_prompt: str
    # where each value came from: {"steps", "guidance", "eta", "stochastic_steps",
    # "negative_prompt"} -> origin
    source: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict:
        """For manifests and metrics: the values and their sources."""
        return {
            "steps": self.sampling.steps,
            "guidance": self.sampling.guidance_scale,
            "eta": self.sampling.eta,
            "stochastic_steps": self.sampling.stochastic_steps,
            "negative_prompt": self.negative_prompt,
            "source": dict(self.source),
        }


def resolve_settings(
    overrides: SamplingOverrides | None,
    trained: TrainedSampler | None,
    origin: str = "checkpoint",
) -> SamplerSettings:
    """Each sampler value from the user if given, else from `trained` (named `origin`), else
    the default."""
    overrides = (overrides or SamplingOverrides()).check()
    if trained is None:
        trained, origin = TrainedSampler(SamplingConfig()), "default"
    values, source = {}, {}
    for name, key in (("steps", "steps"), ("guidance_scale", "guidance"), ("eta", "eta")):
        asked = getattr(overrides, name)
        values[name] = getattr(trained.sampling, name) if asked is None else asked
        source[key] = origin if asked is None else "user"
    # the steps a DDPO policy was trained to take with noise (`SamplingConfig.stochastic_steps`)
    values["stochastic_steps"] = trained.sampling.stochastic_steps
    source["stochastic_steps"] = origin
    asked = overrides.negative_prompt
    negative = trained.negative_prompt if asked is None else asked
    source["negative_prompt"] = origin if asked is None else "user"
    return SamplerSettings(SamplingConfig(**values), negative, source)


# --------------------------------------------------------------------------------- the policy
class TastePolicy:
    """A Stable Diffusion pipeline with a LoRA policy, its taste conditioner (None: a
    taste-blind policy or the base model) and what it was trained with.

    Build one from files with `from_pretrained`, or from already-loaded parts (the trainer):

        TastePolicy(pipe, conditioner, sampling=cfg.sampling, negative_prompt=cfg.negative_prompt,
                    taste_space="rater", taste_names=names, config=to_dict(cfg))
    """

    def __init__(
        self,
        pipe,
        conditioner: TasteConditioner | None = None,
        *,
        sampling: SamplingConfig | None = None,
        negative_prompt: str | None = None,
        taste_space: str = "rater",
        taste_names: list[str] | tuple[str, ...] = (),
        base: str | None = None,
        checkpoint: Path | None = None,
        config: dict | None = None,
    ):
        self.pipe = pipe  # StableDiffusionPipeline with a DDIM scheduler
        self.conditioner = conditioner
        self.taste_space = taste_space
        self.taste_names = list(taste_names)
        self.base = base
        self.checkpoint = checkpoint  # the directory it was loaded from; None if not from files
        self.config = dict(config or {})  # the trainer's whole config, saved with the policy
        self.trained = None if sampling is None else TrainedSampler(sampling, negative_prompt or "")

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(
        cls,
        base: str | None = None,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        compile_unet: bool = False,
    ) -> TastePolicy:
        """The base pipeline, with a checkpoint's LoRA and taste conditioner if one is given, for
        inference (weights frozen, eval mode). `base` defaults to the one the checkpoint was
        trained on. `compile_unet`: torch.compile the UNet in place (on an H200 at 512 px the
        sampler made 2.86 images/s instead of 1.80, after about a minute of compiling)."""
        info = None if checkpoint is None else CheckpointInfo.read(checkpoint)
        base = base or (info.config.get("base") if info else None)
        if not base:
            raise UserError("no base model: pass --base DIR_OR_HUB_ID")
        policy = cls(load_pipeline(base, dtype=dtype, device=device), base=str(base))
        if info is not None:
            policy.load_checkpoint(info.path)
        for module in (policy.pipe.unet, policy.pipe.vae, policy.pipe.text_encoder):
            module.eval().requires_grad_(False)
        if compile_unet:
            policy.pipe.unet.compile()
        return policy

    def load_checkpoint(self, checkpoint: str | Path) -> TastePolicy:
        """Load a checkpoint into this policy, in place: another checkpoint of the same kind
        (LoRA rank, taste conditioner or not) replaces the weights without reloading the
        pipeline, so a run's checkpoints can be read one after another."""
        info = CheckpointInfo.read(checkpoint)
        if self.checkpoint is not None and info.conditioned != (self.conditioner is not None):
            raise UserError(
                f"{info.path}: taste-conditioned and taste-blind checkpoints cannot share a "
                "pipeline; load it with TastePolicy.from_pretrained"
            )
        unet = self.unet
        _, conditioner = load_checkpoint(info.path, unet)
        if conditioner is not None:
            conditioner = conditioner.to(unet.device).eval().requires_grad_(False)
            conditioner.attach(unet)
        unet.requires_grad_(False)
        self.conditioner, self.checkpoint, self.config = conditioner, info.path, info.config
        self.taste_space, self.taste_names = info.taste_space, info.taste_names
        self.trained = info.trained
        return self

    def save_pretrained(self, directory: str | Path, metadata: dict | None = None) -> Path:
        """Write the LoRA, the taste conditioner and checkpoint.json (config with the trained
        sampler, taste space and names, plus `metadata`: epoch, objective, ...), atomically."""
        config = dict(self.config)
        if self.trained is not None:
            config["sampling"] = to_dict(self.trained.sampling)
            config["negative_prompt"] = self.trained.negative_prompt
        meta = {
            **(metadata or {}),
            "taste_space": self.taste_space,
            "tastes": self.taste_names,
            "config": config,
        }
        return save_checkpoint(directory, self.unet, self.conditioner, metadata=meta)

    # ---------------------------------------------------------------- what it was trained with
    @property
    def unet(self):
        return self.pipe.unet

    @property
    def sampling(self) -> SamplingConfig | None:
        """The sampler it was trained with; None for the base model."""
        return None if self.trained is None else self.trained.sampling

    @property
    def negative_prompt(self) -> str | None:
        return None if self.trained is None else self.trained.negative_prompt

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one image's latent."""
        cfg = self.unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def settings(
        self, overrides: SamplingOverrides | None = None, like: TastePolicy | None = None
    ) -> SamplerSettings:
        """The sampler to generate with: the trained values unless overridden. A policy without
        trained values (the base model) takes `like`'s, so both run the same sampler."""
        if self.trained is None and like is not None and like.trained is not None:
            return resolve_settings(overrides, like.trained, f"checkpoint {like.checkpoint}")
        return resolve_settings(overrides, self.trained)

    # ---------------------------------------------------------------- sampling
    def taste_batch(self, tastes: list[torch.Tensor | None]) -> torch.Tensor | None:
        """[B, d] taste vectors from a list of [d] vectors, None standing for the null taste;
        None for a taste-blind policy."""
        if self.conditioner is None:
            assert all(t is None for t in tastes), "a taste-blind policy takes only the null taste"
            return None
        null = self.conditioner.null.detach()
        return torch.stack([null if t is None else t.to(null) for t in tastes])

    def encode_prompts(
        self, prompts: list[str], negative_prompt: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text states of the prompts and of the negative prompt, [B, L, C] each."""
        negative = (self.negative_prompt or "") if negative_prompt is None else negative_prompt
        with torch.no_grad():  # the text encoder is never trained here
            return self.pipe.encode_prompt(
                list(prompts), self.unet.device, 1, True, [negative] * len(prompts)
            )

    def sample(
        self,
        prompts: list[str] | None = None,
        tastes: torch.Tensor | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        negative_embeds: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sampling: SamplingConfig | None = None,
        negative_prompt: str | None = None,
        grad_last_steps: int = 0,
        stochastic: torch.Tensor | None = None,
    ) -> Trajectory:
        """Run the policy from noise to images (`plural_diffusion.sampling.sample`).

        prompts: B prompts, encoded with `negative_prompt` (default: the trained one); or
            prompt_embeds and negative_embeds [B, L, C], already encoded.
        tastes: [B, d] taste vectors; None asks every image for the null taste ("no
            preference"). A taste-blind policy takes only None.
        noise: [B, C, h, w] initial latents x_T; when None they are drawn from `generator`.
        generator: one generator for the batch, or a list of B (one per image: its x_T and the
            noise of each of its DDIM steps, so an image does not depend on its batch).
        sampling: steps, guidance scale and eta; default the trained ones (else the defaults).
        grad_last_steps: K > 0 keeps the graph through the last K steps and the decoder.
        stochastic: bool [steps], the steps drawn with the sampler's eta (the others with eta
            0); None: every step (DDPO's `ddpo.stochastic_window`).
        """
        if (prompts is None) == (prompt_embeds is None):
            raise ValueError("pass prompts or prompt_embeds (with negative_embeds), not both")
        if prompts is not None:
            prompt_embeds, negative_embeds = self.encode_prompts(prompts, negative_prompt)
        assert negative_embeds is not None, "prompt_embeds need negative_embeds"
        if tastes is not None and self.conditioner is None:
            raise UserError(
                "a taste-blind policy (no taste conditioner) cannot be asked for a taste; pass "
                "tastes=None or load a checkpoint trained with objective=matched"
            )
        if noise is None and isinstance(generator, list):
            shape = (1, *self.latent_shape)
            noise = torch.cat([torch.randn(shape, generator=g) for g in generator])
        if noise is not None:
            noise = noise.to(prompt_embeds.device)
        sampling = sampling or self.sampling or SamplingConfig()
        return sample(
            self.unet,
            self.conditioner,
            self.pipe.vae,
            self.pipe.scheduler,
            prompt_embeds,
            negative_embeds,
            tastes,
            sampling,
            generator=generator,
            init_latents=noise,
            grad_last_steps=grad_last_steps,
            stochastic=stochastic,
        )

    def __repr__(self) -> str:
        what = "base model" if self.checkpoint is None else str(self.checkpoint)
        kind = "taste-blind" if self.conditioner is None else "taste-conditioned"
        return f"TastePolicy({what}, {kind}, base={self.base})"
