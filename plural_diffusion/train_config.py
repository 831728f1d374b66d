"""Every hyper-parameter of a taste-conditioned RL run, in one place (loaded from YAML)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from plural_diffusion.conditioning import TasteConditioningConfig
from plural_diffusion.sampling import SamplingConfig
from reward_models.errors import UserError


def default_prompts() -> list[str]:
    # Prompts that leave brightness and colour open, so the taste decides them.
    return [
        "an image of one circle",
        "an image of two squares",
        "an image of three triangles",
        "an image of one striped square",
    ]


@dataclass
class LoraSettings:
    rank: int = 4
    alpha: float = 4.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # objective=matched: one LoRA expert of this rank per taste cluster, each image's update
    # routed by its taste (`plural_diffusion.experts`), so a large or steep taste cannot pull a
    # small one's images toward itself through shared weights
    experts: bool = False
    # with experts: one more LoRA block of this rank shared by every taste (what the tastes have
    # in common), next to each cluster's own. Off: under DDPO the shared block left vivid lower
    # on every seed tried, and under DRaFT it carried most of each taste's look, so a taste
    # could not be given back its best epoch's expert (see benchmarks/RESULTS.md)
    shared_expert: bool = False


@dataclass
class TasteSampling:
    # which tastes the policy is asked to please: cluster centroids, individual raters (the
    # rater head's vectors), or latents: a cluster is drawn, then one of its raters, then a taste
    # from that rater's posterior under the latent head (needs a run with latent.enabled), so
    # the policy covers the region of taste space a new user's few ratings land in
    source: Literal["clusters", "raters", "latents"] = "clusters"
    # "uniform" gives a small cluster as many samples as a large one; "share" follows the shares
    weighting: Literal["uniform", "share"] = "uniform"
    # one prompt and one initial noise shared by a group of samples that differ only in taste,
    # so the advantage isolates the taste's effect (clusters and latents; group size = K).
    # Batches are filled round-robin over the tastes, so any batch size works: a group may
    # span two batches (or two epochs)
    grouped: bool = True


@dataclass
class DDPOSettings:
    epochs: int = 100  # when the top-level `epochs` is 0
    sample_batch_size: int = 12  # images per sampling batch
    sample_batches: int = 2  # sampling batches per epoch
    train_batch_size: int = 12
    inner_epochs: int = 2  # passes over each epoch's samples (see benchmarks/ddpo_sweep_toy.py)
    timestep_fraction: float = 1.0  # of the trainable denoising steps, per minibatch
    # PPO ratio clipping. The log-prob is averaged over the latent's elements (as in DDPO's
    # reference), so 1e-3 per element is ~0.26 nats for a whole 4x8x8 toy latent.
    clip_range: float = 1e-3
    adv_clip_max: float = 5.0
    stat_buffer: int = 64  # rewards remembered per (prompt, taste) key
    stat_min_count: int = 8  # below this many, a key uses its fallback's statistics
    # a rare key's fallback: "taste" (its taste's rewards over every prompt, then the batch's)
    # or "batch" (the whole batch's, every taste together, as DDPO's per-prompt tracker does)
    stat_fallback: str = "batch"
    # stochastic window: 0 samples every denoising step with `sampling.eta` (DDPO's reference).
    # N > 0 makes only N consecutive steps of each epoch's samples stochastic (all of them when
    # N >= sampling.steps) and the rest deterministic DDIM (eta 0), and trains on those N
    # (times `timestep_fraction`): the reward then varies only with the noise of the steps that
    # are credited for it, so an advantage carries less noise from steps the update never sees
    stochastic_window: int = 0
    # where the window sits: "first" (the N noisiest steps, where an image's layout and colours
    # are decided) or "random" (drawn per epoch)
    window_start: str = "first"
    kl_weight: float = 0.0  # KL-to-base penalty (base = same UNet, adapter disabled)
    # train minibatches per optimizer step (their gradients are summed, then one step). DDPO's
    # reference takes few, large steps per epoch; 1 = a step per minibatch
    gradient_accumulation: int = 1
    # how the update's minibatches are drawn from the epoch's samples: "rows" (shuffled rows of
    # every sampling batch together, as DDPO's reference does) or "batches" (whole sampling
    # batches in shuffled order; needs train_batch_size == sample_batch_size). On a GPU in bf16
    # a row's UNet output depends on which rows share its batch, so only "batches" recomputes
    # the sampler's log-probs exactly (benchmarks/results/gpu_proof-h200-gap.json)
    shuffle: str = "rows"
    # where the PPO ratio's old log-probs come from: "sampler" (stored while sampling, as DDPO's
    # reference) or "update" (recomputed by the update's own forward before its first optimizer
    # step: one more forward per trainable step, about a third more update time). A compiled
    # UNet (compile_unet) runs other kernels with autograd on than off, and in bf16 that put the
    # sampler's log-probs 1e-3 off the update's, 10x clip_range
    # (benchmarks/results/gpu_proof-h200-compile.json); "update" starts every update at a
    # ratio of 1. With shuffle=rows only the first inner epoch's minibatches are the ones
    # recomputed
    old_log_probs: str = "sampler"
    save_every: int = 5  # when the top-level `save_every` is 0
    select_looks: float = 0.0  # when the top-level `select_looks` is unset


@dataclass
class DraftSettings:
    epochs: int = 20  # when the top-level `epochs` is 0
    save_every: int = 5  # when the top-level `save_every` is 0
    select_looks: float = 0.0  # when the top-level `select_looks` is unset
    batch_size: int = 12
    # batch_size counts images per taste cluster: objective=matched over K clusters draws
    # batch_size * K images a step, so each cluster's expert learns from as many images as a
    # taste-blind policy's one LoRA does (the taste-blind objectives draw batch_size)
    batch_per_taste: bool = False
    steps_per_epoch: int = 2
    last_k_steps: int = 1  # backpropagate the reward through the last K denoising steps
    # divide each image's reward by the running std of its (prompt, taste) key's rewards, as
    # DDPO's advantages do: tastes are scored by heads of different steepness, and without it
    # the steepest head's taste takes most of the shared LoRA's updates
    normalize: bool = True
    # recompute the VAE decoder's activations in the backward pass instead of keeping them:
    # at 512 px the decoder's activations are the largest tensors of a DRaFT step
    checkpoint_decoder: bool = False
    # KL-to-base penalty at one random earlier denoising step per batch (the steps that set an
    # image's layout), against the same UNet with the LoRA off: keeps several looks per taste
    kl_weight: float = 0.0
    # minus this times the mean CLIP cosine similarity between images asked for the same taste
    # in a batch: reward backpropagation otherwise finds one look per taste
    diversity_weight: float = 0.0
    # penalise each taste's similarity only above the base model's own (its images drawn as
    # training draws them, same-taste pairs): push each taste's looks up to the base's variety
    diversity_above_base: bool = False


@dataclass
class MaxminSettings:
    # objective=maxmin: each cluster's head is standardised on the base model's own images
    # (this many batches, drawn at the start), so clusters compare like with like; each
    # batch's images are shared out between the clusters in equal parts, each image to the
    # clusters it is relatively best for (`rewards.NeedAssignment`)
    calibration_batches: int = 2
    temperature: float = 0.5  # of the assignment, in standard deviations of the base's scores
    momentum: float = 0.9  # of the running per-cluster estimates


@dataclass
class TrainConfig:
    base: str = ""  # diffusers SD pipeline: local directory or hub id
    rewards: str = ""  # reward run directory written by `reward-models train`
    objective: Literal["matched", "mean", "maxmin"] = "matched"
    # objective=mean scores with this head directory instead of the run's mean head: e.g. a
    # social head (`reward-models social`), trained on an explicit vote of simulated raters
    mean_head: str = ""
    method: Literal["ddpo", "draft"] = "ddpo"
    prompts: list[str] = field(default_factory=default_prompts)
    negative_prompt: str = ""
    # 0: the method's own number (ddpo.epochs or draft.epochs; the methods need very different
    # numbers of samples), so switching `method` alone gives a sensible run
    epochs: int = 0
    lr: float = 3e-4
    # "cosine": lr falls from `lr` to lr * lr_final along a half cosine over the run's epochs
    # (a high rate early leaves a reward's plateau, a low one late stops the noise of small
    # batches per taste from undoing what was reached); a function of the epoch, so a resumed
    # run follows the same schedule
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_final: float = 0.1
    # epochs over which the rate climbs linearly to the schedule's (epoch e of N at (e+1)/(N+1)
    # of it): the first updates, made before the advantages' running statistics settle, are small
    lr_warmup: int = 0
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    # reward - k * std over the reward run's rater-head ensemble (over-optimisation guard; the
    # run needs ensemble_size > 0)
    ensemble_penalty: float = 0.0
    # matched: each taste's reward becomes (1 - w s) head(x, z) + w s mean_head(x), s the share
    # of the raters in its cluster, w this: the majority borrows the mean head's sharper view of
    # its own taste, a small minority's reward is nearly its own (0: off; taste-blind objectives
    # ignore it, as they ignore `conditioning`)
    mean_blend: float = 0.0
    # matched with LoRA experts (tastes by cluster): after training, each cluster keeps its expert
    # block from the saved checkpoint (every `checkpoint_every` epochs, or the last) where that
    # taste's own head scores its held-out images highest, beside the last epoch's shared block
    # (with `conditioning.expert_tokens` its taste module comes from the same checkpoint; a
    # shared module stays the last epoch's); written to checkpoints/selected
    # (`plural_diffusion.expert_selection`).
    # Taste-blind objectives have no experts and ignore it
    select_experts: bool = False
    select_images: int = 16  # held-out images per taste and candidate (fixed prompts and noise)
    # a checkpoint's expert replaces the last epoch's only if its held-out reward is higher by
    # this share of the last epoch's gain over the base model (the heads are unsure at the top)
    select_min_gain: float = 0.05
    # a taste may give up this share of its best checkpoint's held-out gain over the base model
    # for looks: of the checkpoints within it, the one whose held-out images are most varied
    # (Vendi score of their CLIP features) is kept (`expert_selection.pick_varied`; 0: off).
    # Unset: the method's own (draft.select_looks or ddpo.select_looks)
    select_looks: float | None = None
    # matched with LoRA experts (tastes by cluster): every `restart_every` epochs up to
    # `restart_until` of the run, each taste's own head scores every taste's held-out images;
    # a taste whose own images gained less than `restart_ratio` of what another taste's images
    # gain over the base model's on its head, and trail them by `restart_min_gap` of its head's
    # std over the reward run's rated images, takes that taste's expert block, optimizer moments
    # included, and trains on from there (an expert stuck in the wrong mode jumps to the better
    # one its own head sees; `plural_diffusion.expert_selection.lagging_experts`). Its earlier
    # checkpoints are then no candidates for `select_experts`. Taste-blind objectives ignore it
    restart_experts: bool = False
    restart_every: int = 2
    restart_until: float = 0.5
    restart_ratio: float = 0.5
    restart_min_gap: float = 0.5
    seed: int = 0
    out_dir: str = "runs/policy"
    # epochs between checkpoints (the last epoch is always saved; they are `select_experts`'s
    # candidates). 0: the method's own (ddpo.save_every or draft.save_every), as for `epochs`
    save_every: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # fp16 needs CUDA (loss scaling)
    # under bf16/fp16 the frozen UNet and VAE are stored in that dtype. false: they run in it, as
    # diffusers' pipelines do (LoRA and taste module stay float32 masters). true: under
    # torch.autocast, which keeps norms and softmax in float32: measured 1.6x slower per UNet
    # call on an H100 at 512 px (benchmarks/results/gpu_proof.json)
    autocast: bool = False
    # UNet activation checkpointing: less memory for DDPO minibatches and DRaFT's last steps,
    # at the cost of a second UNet forward in the backward pass (~30% slower per update)
    gradient_checkpointing: bool = False
    # "xformers" needs xformers installed and CUDA, and does not compose with taste tokens
    # (their attention processors use PyTorch SDPA): taste-blind objectives or mode=timestep
    attention: Literal["sdpa", "xformers"] = "sdpa"
    # torch.compile the UNet in place, so sampling and the update both run compiled (compiling
    # one of them only would put DDPO's recomputed log-probs off the sampler's). The first epoch
    # pays the compilation; see the README's H200 section for what it buys there
    compile_unet: bool = False
    allow_tf32: bool = True  # TF32 matmuls on GPUs that have them (Ampere and newer)
    # image side in pixels; None: the base model's own (512 for SD 1.5)
    resolution: int | None = None
    # "sd15": refuse a base whose UNet / VAE / text encoder is not shaped like SD 1.x
    expect_architecture: Literal["", "sd15"] = ""
    tensorboard: bool = True  # per-epoch scalars through accelerate's tracker (and log.jsonl)
    device: str = "auto"  # "auto": accelerate's choice
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    conditioning: TasteConditioningConfig = field(default_factory=TasteConditioningConfig)
    taste: TasteSampling = field(default_factory=TasteSampling)
    ddpo: DDPOSettings = field(default_factory=DDPOSettings)
    draft: DraftSettings = field(default_factory=DraftSettings)
    maxmin: MaxminSettings = field(default_factory=MaxminSettings)

    @property
    def n_epochs(self) -> int:
        """The epochs this run trains: `epochs`, or the method's own when that is 0."""
        return self.epochs or (self.draft.epochs if self.method == "draft" else self.ddpo.epochs)

    @property
    def looks_share(self) -> float:
        """The share of its gain a taste may give up for looks in the selection: `select_looks`,
        or the method's own when unset."""
        if self.select_looks is not None:
            return self.select_looks
        return self.draft.select_looks if self.method == "draft" else self.ddpo.select_looks

    @property
    def checkpoint_every(self) -> int:
        """Epochs between this run's checkpoints: `save_every`, or the method's own when 0."""
        return self.save_every or (
            self.draft.save_every if self.method == "draft" else self.ddpo.save_every
        )


def check_options(cfg: TrainConfig, cpu: bool) -> None:
    """One-line errors for settings that cannot run here, before any model is loaded."""
    if cfg.mixed_precision == "fp16" and cpu:
        raise UserError(
            "mixed_precision=fp16 needs a CUDA GPU (its loss scaler is CUDA's); "
            "on a CPU use mixed_precision=bf16 or no"
        )
    if cfg.attention == "xformers":
        if cfg.objective == "matched" and cfg.conditioning.mode == "tokens":
            raise UserError(
                "attention=xformers does not compose with taste tokens (their attention "
                "processors run PyTorch SDPA and would replace xformers'); use attention=sdpa "
                "(as fast on PyTorch >= 2) or conditioning.mode=timestep"
            )
        if importlib.util.find_spec("xformers") is None:
            raise UserError(
                "attention=xformers but xformers is not installed; "
                "pip install xformers, or use attention=sdpa"
            )
        if cpu:
            raise UserError("attention=xformers runs on CUDA only; use attention=sdpa")
    taste = cfg.taste
    if taste.weighting == "share" and taste.grouped and taste.source in ("clusters", "latents"):
        raise UserError(
            "taste.weighting=share has no effect with taste.grouped=true (each group holds one "
            "image per taste); set taste.grouped=false to draw tastes by their shares"
        )
    per_expert = {  # options that act on each taste cluster's LoRA expert block
        "select_experts": (cfg.select_experts, "picks each taste cluster's LoRA expert"),
        "restart_experts": (
            cfg.restart_experts,
            "restarts a taste cluster's LoRA expert from another's",
        ),
        "draft.batch_per_taste": (
            cfg.draft.batch_per_taste,
            "draws draft.batch_size images for each taste cluster's expert",
        ),
    }
    routed = cfg.lora.experts and taste.source in ("clusters", "latents")
    for option, (on, what) in per_expert.items():
        if on and cfg.objective == "matched" and not routed:
            raise UserError(
                f"{option}=true {what}, so it needs lora.experts=true and taste.source=clusters "
                f"or latents; set {option}=false to train without it"
            )
    if cfg.restart_every < 1:
        raise UserError(f"restart_every={cfg.restart_every}: epochs between checks, >= 1")
    if not 0.0 <= cfg.restart_until <= 1.0:
        raise UserError(f"restart_until={cfg.restart_until}: a fraction of the epochs, in [0, 1]")
    if not 0.0 < cfg.restart_ratio <= 1.0:
        raise UserError(f"restart_ratio={cfg.restart_ratio}: a share of the gain, in (0, 1]")
    if cfg.restart_min_gap < 0:
        raise UserError(f"restart_min_gap={cfg.restart_min_gap}: in head std units, >= 0")
    if cfg.save_every < 0 or min(cfg.ddpo.save_every, cfg.draft.save_every) < 1:
        raise UserError(
            f"save_every={cfg.save_every} (ddpo.save_every={cfg.ddpo.save_every}, "
            f"draft.save_every={cfg.draft.save_every}): epochs between checkpoints, >= 1 "
            "(save_every=0: the method's own)"
        )
    if cfg.select_images < 1:
        raise UserError(f"select_images={cfg.select_images}: must be >= 1")
    if cfg.select_min_gain < 0:
        raise UserError(f"select_min_gain={cfg.select_min_gain}: must be >= 0")
    for name, looks in (
        ("select_looks", cfg.select_looks),
        ("draft.select_looks", cfg.draft.select_looks),
        ("ddpo.select_looks", cfg.ddpo.select_looks),
    ):
        if looks is not None and not 0.0 <= looks < 1.0:
            raise UserError(f"{name}={looks}: a share of the best checkpoint's gain, in [0, 1)")
    if not 0.0 <= cfg.mean_blend <= 1.0:
        raise UserError(f"mean_blend={cfg.mean_blend}: a weight in [0, 1] (0: off)")
    if cfg.lr_warmup < 0:
        raise UserError(f"lr_warmup={cfg.lr_warmup}: epochs, >= 0")
    if not 0.0 <= cfg.lr_final <= 1.0:
        raise UserError(f"lr_final={cfg.lr_final}: a fraction of lr, in [0, 1]")
    if cfg.ddpo.gradient_accumulation < 1:
        raise UserError(
            f"ddpo.gradient_accumulation={cfg.ddpo.gradient_accumulation}: must be >= 1"
        )
    if cfg.ddpo.stochastic_window < 0:
        raise UserError(
            f"ddpo.stochastic_window={cfg.ddpo.stochastic_window}: steps, >= 0 (0: every step)"
        )
    if cfg.ddpo.window_start not in ("first", "random"):
        raise UserError(f"ddpo.window_start={cfg.ddpo.window_start!r}: use first or random")
    if cfg.sampling.stochastic_steps:
        raise UserError(
            f"sampling.stochastic_steps={cfg.sampling.stochastic_steps}: a policy's own record of "
            "DDPO's window, not a training option; set ddpo.stochastic_window instead"
        )
    if cfg.ddpo.shuffle not in ("rows", "batches"):
        raise UserError(f"ddpo.shuffle={cfg.ddpo.shuffle!r}: use rows or batches")
    if cfg.ddpo.old_log_probs not in ("sampler", "update"):
        raise UserError(f"ddpo.old_log_probs={cfg.ddpo.old_log_probs!r}: use sampler or update")
    if cfg.ddpo.shuffle == "batches" and cfg.ddpo.train_batch_size != cfg.ddpo.sample_batch_size:
        raise UserError(
            f"ddpo.shuffle=batches trains on whole sampling batches: set ddpo.train_batch_size="
            f"{cfg.ddpo.sample_batch_size} (ddpo.sample_batch_size), or use ddpo.shuffle=rows"
        )
    if cfg.ddpo.stat_fallback not in ("taste", "batch"):
        raise UserError(f"ddpo.stat_fallback={cfg.ddpo.stat_fallback!r}: use taste or batch")
    if not 0.0 <= cfg.conditioning.taste_dropout < 1.0:
        raise UserError(
            f"conditioning.taste_dropout={cfg.conditioning.taste_dropout}: must be in [0, 1)"
        )
