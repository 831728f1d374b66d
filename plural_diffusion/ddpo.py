"""The trainer: a taste-conditioned LoRA policy, rewarded by the head for the taste it was asked.

One loop, four phases per epoch (as DDPO's reference script):

    1. sampling      draw prompts and tastes, run the DDIM policy, keep trajectories
    2. rewards       score each image with the head for *its* taste (see `TasteRewards.reward`)
    3. advantages    normalise rewards per (prompt, taste) key
    4. training      PPO-clipped importance-ratio updates over the stored denoising steps

`method="draft"` replaces phases 1-4 by reward backpropagation through the last K denoising
steps (DRaFT-K / AlignProp): our heads are differentiable, so it needs far fewer samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from plural_diffusion.advantages import PerKeyStatTracker
from plural_diffusion.backbone import (
    CHECKPOINT_JSON,
    TASTE_DIR,
    add_lora,
    architecture_mismatch,
    disable_adapters,
    load_checkpoint,
    load_pipeline,
    lora_state,
    read_lora_state,
    set_lora_state,
    trainable_parameters,
)
from plural_diffusion.conditioning import CONFIG_NAME, TasteConditioner, load_taste_conditioner
from plural_diffusion.ddim import ddim_posterior, ddim_step_with_logprob, trainable_step_mask
from plural_diffusion.diversity import vendi_score
from plural_diffusion.expert_selection import (
    copy_expert_block,
    lagging_experts,
    pick_varied,
    with_expert_block,
)
from plural_diffusion.policy import TastePolicy
from plural_diffusion.rewards import NeedAssignment, TasteRewards
from plural_diffusion.sampling import SamplingConfig, guided_noise
from plural_diffusion.train_config import TrainConfig, check_options
from plural_diffusion.trainer_state import (
    STATE_JSON,
    gather_per_rank,
    optimizer_from_plain,
    optimizer_to_plain,
    rank_tensors,
    read_state,
    write_state,
)
from plural_diffusion.unwrap import unwrap
from reward_models.config import to_dict
from reward_models.errors import UserError
from reward_models.io import atomic_dir, read_json, write_json

POLICY_DIR = "policy"
SELECTED_DIR = "selected"  # checkpoints/selected: the per-taste expert selection
# fp16: the loss scaler skips a step whose gradients overflow and halves the scale; this many
# skips in a row means the gradients are non-finite at any scale
MAX_SKIPPED_STEPS = 20


class Trainer:
    def __init__(self, cfg: TrainConfig, gold_fn=None):
        """gold_fn: optional images [B, 3, H, W] -> gold utility per cluster [B, K] (toy world),
        used for logging only; training never sees it."""
        from accelerate import Accelerator

        if not cfg.base:
            raise UserError("no base model: set base=PATH_OR_HUB_ID")
        if not cfg.rewards:
            raise UserError("no reward heads: set rewards=RUN_DIR (from `reward-models train`)")
        if not cfg.prompts:
            raise UserError("no prompts: set prompts=[...]")
        self.cfg = cfg
        self.gold_fn = gold_fn
        cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        check_options(cfg, cpu)
        torch.manual_seed(cfg.seed)  # LoRA and taste-module initialisation
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=cpu,
            log_with="tensorboard" if cfg.tensorboard else None,
            project_dir=cfg.out_dir,
        )
        self.device = self.accelerator.device
        cuda = self.device.type == "cuda"
        if cfg.allow_tf32 and cuda and torch.cuda.get_device_capability(self.device)[0] >= 8:
            torch.set_float32_matmul_precision("high")  # TF32 matmuls (Ampere and newer)
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

        # ---- models: frozen base + LoRA (+ taste conditioner for the matched objective)
        weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        self.pipe = load_pipeline(
            cfg.base,
            dtype=weight_dtype[cfg.mixed_precision],
            device=self.device,
            xformers=cfg.attention == "xformers",
        )
        if cfg.expect_architecture and (
            why := architecture_mismatch(self.pipe, cfg.expect_architecture)
        ):
            raise UserError(
                f"{cfg.base}: expect_architecture={cfg.expect_architecture} but its {why}; "
                "use a Stable Diffusion 1.x base, or set expect_architecture='' for another model"
            )
        self.latent_size = self._latent_size()
        self.unet = self.pipe.unet
        for module in (self.pipe.vae, self.pipe.text_encoder, self.unet):
            module.requires_grad_(False)
        space = "latent" if cfg.taste.source == "latents" else "rater"
        self.rewards = TasteRewards(
            cfg.rewards, device=self.device, space=space, mean_head=cfg.mean_head or None
        )
        n_experts = self._n_experts()
        shared = n_experts > 1 and cfg.lora.shared_expert
        # each block is a LoRA of rank r with alpha / r scaling, as one LoRA without experts
        n_blocks = n_experts + int(shared)
        lora_rank, lora_alpha = cfg.lora.rank * n_blocks, cfg.lora.alpha * n_blocks
        add_lora(self.unet, lora_rank, lora_alpha, cfg.lora.target_modules)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if cfg.method == "draft" and cfg.draft.checkpoint_decoder:
            # diffusers' own decoder checkpointing: active only while grad is on (DRaFT's
            # backprop path), so DDPO-style no-grad decoding is unaffected
            self.pipe.vae.enable_gradient_checkpointing()
        clip_size = max(self.rewards.encoder.image_size)
        if clip_size > self.latent_size * self.pipe.vae_scale_factor:
            raise UserError(
                f"the reward run's CLIP reads {clip_size} px images but the policy makes "
                f"{self.latent_size * self.pipe.vae_scale_factor} px ones, which it would score "
                f"upsampled; set resolution>={clip_size} or use a reward run on a CLIP for this size"
            )
        if cfg.ensemble_penalty > 0 and not self.rewards.members:
            raise UserError(
                f"ensemble_penalty={cfg.ensemble_penalty} needs a reward run with ensemble heads; "
                f"retrain {cfg.rewards} with ensemble_size=N (e.g. 4)"
            )
        self.conditioner = None
        if cfg.objective == "matched":
            tokens = cfg.conditioning.expert_tokens
            if tokens is None:  # with LoRA experts, each expert its own taste module
                tokens = n_experts > 1
            centred = cfg.conditioning.centred_experts
            if centred is None:  # a new run centres its taste modules' inputs
                centred = tokens
            conditioning = dataclasses.replace(
                cfg.conditioning,
                taste_dim=self.rewards.taste_dim,
                experts=n_experts if n_experts > 1 else 0,
                shared_expert=shared,
                expert_tokens=tokens,
                centred_experts=centred,
            )
            self.conditioner = TasteConditioner.for_unet(conditioning, self.unet).to(self.device)
            if n_experts > 1:
                self.conditioner.set_experts(self.rewards.cluster_tastes)
            self.conditioner.attach(self.unet)
        if cfg.compile_unet:
            self.unet.compile()  # in place: every caller (sampler, update, policy) runs compiled
        self.tastes, self.taste_names, self.taste_weights = self._taste_table()
        # what is trained and saved: the LoRA, the taste module, and how it samples
        self.policy = TastePolicy(
            self.pipe,
            self.conditioner,
            sampling=self._trained_sampling(),
            negative_prompt=cfg.negative_prompt,
            taste_space=self.rewards.space,
            taste_names=self.taste_names,
            base=cfg.base,
            config=to_dict(cfg),
        )
        self.params = trainable_parameters(self.unet, self.conditioner)
        # prepared: accelerate's wrapper unscales fp16 gradients (clip_grad_norm_) and skips a
        # step whose gradients overflowed. Not the UNet: its LoRA gradients are averaged over
        # processes by hand (`_optimizer_step`), as the LoRA lives outside any DDP wrapper.
        self.optimizer = self.accelerator.prepare_optimizer(
            torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        )
        self.tracker = PerKeyStatTracker(cfg.ddpo.stat_buffer, cfg.ddpo.stat_min_count)
        self._warned_gap = False
        self.generator = torch.Generator().manual_seed(cfg.seed + self.accelerator.process_index)
        # grouped sampling: the rest of a group (prompt, taste, initial noise) a batch cut off
        self.pending = (
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, *self._latent_shape()),
        )
        self.skipped_steps = 0  # consecutive fp16 steps skipped on overflow
        self.epoch_skipped = 0  # fp16 steps skipped in this epoch
        self.epoch = 0
        self.history: list[dict] = []
        with torch.no_grad():
            self.prompt_embeds, self.negative_embeds = self.pipe.encode_prompt(
                cfg.prompts, self.device, 1, True, [cfg.negative_prompt] * len(cfg.prompts)
            )
        self.maxmin = None
        if cfg.objective == "maxmin":
            self.maxmin = NeedAssignment(
                len(self.rewards.cluster_names), cfg.maxmin.temperature, cfg.maxmin.momentum
            )
            self._calibrate_clusters()
        self._held_out_base = None  # `held_out_base_reward`, once sampled
        self.head_spread = None  # [K] each cluster head's std over the rated images
        if cfg.restart_experts and cfg.objective == "matched":
            try:
                self.head_spread = self.rewards.rated_cluster_spread().tolist()
            except UserError as error:
                raise UserError(
                    f"restart_experts=true scales each head by its spread over the reward run's "
                    f"rated images, which did not load ({error}); set restart_experts=false"
                ) from None
        self.base_similarity = None
        if (
            cfg.method == "draft"
            and cfg.draft.diversity_weight > 0
            and cfg.draft.diversity_above_base
        ):
            self.base_similarity = self._base_within_taste_similarity()

    @contextlib.contextmanager
    def _draws_aside(self, seed: int | None = None):
        """Draw batches from a generator of their own (seeded `seed`, or from the run's seed)
        and keep the pending group, so that training draws the same prompts and noise with or
        without what runs inside."""
        kept = self.generator, self.pending
        self.generator = torch.Generator().manual_seed(
            self.cfg.seed + 7919 if seed is None else seed
        )
        try:
            yield
        finally:
            self.generator, self.pending = kept

    @torch.no_grad()
    def _base_within_taste_similarity(self, batches: int = 2) -> float:
        """`_within_taste_similarity` of the base model's images (LoRA off, no taste), drawn as
        training draws its batches (`_draws_aside`)."""
        base = TastePolicy(self.pipe, None, sampling=self.cfg.sampling)
        similarities = []
        with self._draws_aside(), disable_adapters(self.unet):
            for _ in range(batches):
                _, taste, _, traj = self._sample_batch(self._draft_batch(), policy=base)
                similarities.append(self._within_taste_similarity(traj.images.float(), taste))
        return float(self.accelerator.reduce(torch.stack(similarities).mean(), "mean"))

    def _draft_batch(self) -> int:
        """Images a DRaFT step draws: `draft.batch_size`, times the taste clusters with
        `draft.batch_per_taste` and experts (each expert then sees `batch_size` a step)."""
        draft = self.cfg.draft
        return draft.batch_size * (self._n_experts() if draft.batch_per_taste else 1)

    def _n_experts(self) -> int:
        """LoRA experts: one per taste cluster with lora.experts for objective=matched, else 1
        (one LoRA; the taste-blind objectives have no taste to route by)."""
        cfg = self.cfg
        if not cfg.lora.experts or cfg.objective != "matched":
            return 1
        k = len(self.rewards.cluster_names)
        if k < 2:
            raise UserError(
                f"lora.experts needs at least 2 taste clusters, the reward run has {k}; set "
                "lora.experts=false (one shared LoRA)"
            )
        return k

    @torch.no_grad()
    def _calibrate_clusters(self) -> None:
        """maxmin: standardise each cluster's head on the base model's own images (the fresh
        LoRA is the identity), drawn aside (`_draws_aside`)."""
        images = []
        with self._draws_aside():
            for _ in range(self.cfg.maxmin.calibration_batches):
                *_, traj = self._sample_batch(self.cfg.draft.batch_size)
                images.append(traj.images.float())
        self.rewards.calibrate(self.accelerator.gather(torch.cat(images)))

    # ------------------------------------------------------------------ tastes and batches
    def _taste_table(self):
        """The tastes a policy is asked for: [N, d] vectors, names, sampling weights [N]."""
        if self.cfg.objective != "matched":
            return None, ["none"], torch.ones(1)
        if self.cfg.taste.source == "raters":
            n = len(self.rewards.rater_ids)
            return self.rewards.rater_tastes, self.rewards.rater_ids, torch.ones(n)
        # clusters, and latents (drawn per cluster, see `_latent_tastes`)
        shares = self.rewards.cluster_shares
        weights = shares if self.cfg.taste.weighting == "share" else torch.ones_like(shares)
        return self.rewards.cluster_tastes, self.rewards.cluster_names, weights

    def _latent_tastes(self, cluster: torch.Tensor) -> torch.Tensor:
        """For each cluster index [B]: one of its raters at random, then a taste drawn from
        that rater's posterior, [B, d]."""
        g, r = self.generator, self.rewards
        rater = torch.stack(
            [
                m[torch.randint(len(m), (1,), generator=g)][0]
                for m in (r.cluster_members[int(k)] for k in cluster)
            ]
        )
        mean, var = r.rater_tastes[rater], r.rater_taste_var[rater]
        return mean + var.sqrt() * torch.randn(mean.shape, generator=g).to(mean.device)

    def _latent_size(self) -> int:
        """The latents' side: `resolution` over the VAE's downsampling (default: the UNet's)."""
        unet_cfg, factor = self.pipe.unet.config, self.pipe.vae_scale_factor
        if self.cfg.resolution is None:
            return unet_cfg.sample_size
        multiple = factor * 2 ** (len(unet_cfg.down_block_types) - 1)
        if self.cfg.resolution < multiple or self.cfg.resolution % multiple:
            raise UserError(
                f"resolution={self.cfg.resolution}: this base model needs a multiple of "
                f"{multiple} (its own is {unet_cfg.sample_size * factor})"
            )
        return self.cfg.resolution // factor

    def _latent_shape(self) -> tuple[int, int, int]:
        return (self.pipe.unet.config.in_channels, self.latent_size, self.latent_size)

    def draw_batch(self, batch: int):
        """Prompt indices [B], taste indices [B], taste vectors [B, d] | None, initial noise.

        Grouped (clusters, latents): a group is one prompt and one initial noise with one
        sample per taste; batches are filled with whole groups, round-robin over the tastes,
        and the rest of a group a batch cuts off starts the next batch, so any batch size works.
        Taste dropout: a row whose policy is asked for the null taste has its taste index
        raised by the number of tastes; `z` stays the taste it is scored for.
        """
        g = self.generator
        n_tastes = len(self.taste_names)
        per_cluster = self.cfg.taste.source in ("clusters", "latents")
        grouped = self.cfg.taste.grouped and self.tastes is not None and per_cluster
        if grouped:
            prompt, taste, noise = self.pending
            if (missing := batch - len(prompt)) > 0:
                groups = -(-missing // n_tastes)
                new_prompt = torch.randint(len(self.cfg.prompts), (groups,), generator=g)
                new_noise = torch.randn((groups, *self._latent_shape()), generator=g)
                prompt = torch.cat([prompt, new_prompt.repeat_interleave(n_tastes)])
                taste = torch.cat([taste, torch.arange(n_tastes).repeat(groups)])
                noise = torch.cat([noise, new_noise.repeat_interleave(n_tastes, dim=0)])
            self.pending = (prompt[batch:], taste[batch:], noise[batch:])
            prompt, taste, noise = prompt[:batch], taste[:batch], noise[:batch]
        else:
            prompt = torch.randint(len(self.cfg.prompts), (batch,), generator=g)
            taste = torch.multinomial(self.taste_weights, batch, replacement=True, generator=g)
            noise = torch.randn((batch, *self._latent_shape()), generator=g)
        if self.tastes is None:
            z = None
        elif self.cfg.taste.source == "latents":
            z = self._latent_tastes(taste)
        else:
            z = self.tastes[taste.to(self.tastes.device)]
        if self.conditioner is not None and (p := self.conditioner.config.taste_dropout) > 0:
            taste = torch.where(torch.rand(batch, generator=g) < p, taste + n_tastes, taste)
        return prompt, taste, z, noise.to(self.device)

    def _policy_taste(self, z, taste):
        """The tastes [B, d] the policy is asked for: `z`, and the learned null taste in rows
        that taste dropout picked. Scored for their drawn taste, those rows train the null
        taste as "please a taste drawn at random": the taste-marginal that CFG's
        unconditional half (null taste, empty prompt) and `generate --taste mean` ask for."""
        dropped = taste >= len(self.taste_names)  # [B] on the CPU
        if z is None or not dropped.any():
            return z
        null = self.conditioner.null_taste(len(z)).to(z.dtype)
        return torch.where(dropped.to(z.device)[:, None], null, z)

    def precision(self):
        """The context the policy's UNet and VAE run in: torch.autocast with `autocast: true`,
        else their own (mixed-precision) dtype, the inputs cast to it by `unet_forward`."""
        return self.accelerator.autocast() if self.cfg.autocast else contextlib.nullcontext()

    def _embeds(self, prompt: torch.Tensor):
        idx = prompt.to(self.device)
        return self.prompt_embeds[idx], self.negative_embeds[idx]

    def _sample_batch(self, batch: int, grad_last_steps: int = 0, policy=None, stochastic=None):
        """Draw a batch (`draw_batch`) and run the policy on it: prompt indices [B], taste
        indices [B], the tastes z it is scored for [B, d] | None, and the trajectory, with the
        graph kept through the last `grad_last_steps` steps (DRaFT). `policy`: another one
        than the trainer's (a taste-blind one is asked for no taste). `stochastic`: the steps
        drawn with the sampler's eta (`_stochastic_window`), None for all."""
        policy = policy or self.policy
        prompt, taste, z, noise = self.draw_batch(batch)
        embeds, negative = self._embeds(prompt)
        tastes = None if policy.conditioner is None else self._policy_taste(z, taste)
        with self.precision():
            traj = policy.sample(
                prompt_embeds=embeds,
                negative_embeds=negative,
                tastes=tastes,
                noise=noise,
                generator=self.generator,
                grad_last_steps=grad_last_steps,
                stochastic=stochastic,
            )
        return prompt, taste, z, traj

    def _trained_sampling(self) -> SamplingConfig:
        """The sampler the policy is trained for, saved with it: `sampling`, and with DDPO's
        stochastic window (first N steps) only those steps with noise. Its held-out images, and
        `generate` and `evaluate`, then sample what training rewarded. Measured over the toy
        demo's seeds 0-4, each taste its own module: seed 0's vivid .425 with noise in every
        step (its images pleased noir more, .562), .549 sampled as trained
        (benchmarks/RESULTS.md)."""
        ddpo, sampling = self.cfg.ddpo, self.cfg.sampling
        first = ddpo.window_start == "first" and 0 < ddpo.stochastic_window < sampling.steps
        window = ddpo.stochastic_window if self.cfg.method == "ddpo" and first else 0
        return dataclasses.replace(sampling, stochastic_steps=window)

    def _stochastic_window(self) -> torch.Tensor | None:
        """bool [steps]: this epoch's stochastic steps under `ddpo.stochastic_window` (the
        first N, or N consecutive ones drawn per epoch), None when every step is (N = 0, or
        N >= the sampling steps)."""
        ddpo, steps = self.cfg.ddpo, self.cfg.sampling.steps
        if not 0 < ddpo.stochastic_window < steps:
            return None
        start = 0
        if ddpo.window_start == "random":
            # windows that end at or before the last step with noise (a final zero-variance
            # step has no log-prob to train on)
            scheduler = self.pipe.scheduler
            scheduler.set_timesteps(steps, device=self.device)
            mask = trainable_step_mask(scheduler, None, self.cfg.sampling.eta)
            last = int(mask.nonzero().max())
            span = max(1, last - ddpo.stochastic_window + 2)
            start = int(torch.randint(span, (1,), generator=self.generator))
        window = torch.zeros(steps, dtype=torch.bool)
        window[start : start + ddpo.stochastic_window] = True
        return window

    def _reward(self, images, z, taste, features=None):
        """The reward of each image for the taste it was generated for, [B] (taste: indices
        into the taste table, for the ensemble penalty; features: the images' CLIP features,
        when the caller already has them).

        In float32 whatever the training precision: CLIP and the heads were fitted on float32
        features, and under bf16 autocast the reward moves by more than the differences
        between images that DDPO's advantages rank. Gradients still flow (DRaFT)."""
        with torch.autocast(self.device.type, enabled=False):
            return self.rewards.reward(
                images.float(),
                None if z is None else z.float(),
                self.cfg.objective,
                penalty=self.cfg.ensemble_penalty,
                taste_index=None if taste is None else taste % len(self.taste_names),
                source=self.cfg.taste.source,
                assign=None if self.maxmin is None else self._assign_by_need,
                mean_blend=self.cfg.mean_blend,
                features=features,
            )

    def _assign_by_need(self, scores: torch.Tensor) -> torch.Tensor:
        """maxmin: fold this batch's standardised cluster scores [B, K] (mean over every
        process) into the running estimates, then share the batch out by need, [B, K]."""
        self.maxmin.observe(self.accelerator.reduce(scores.float().mean(dim=0), "mean"))
        return self.maxmin.assign(scores)

    # ------------------------------------------------------------------ one epoch
    def learning_rate(self, epoch: int) -> float:
        """The learning rate of `epoch` under `lr_schedule`, after `lr_warmup`."""
        cfg = self.cfg
        warmup = min(1.0, (epoch + 1) / (cfg.lr_warmup + 1))
        if cfg.lr_schedule == "constant":
            return cfg.lr * warmup
        progress = min(1.0, epoch / max(1, cfg.n_epochs - 1))
        return (
            cfg.lr
            * warmup
            * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * progress)))
        )

    def train_epoch(self) -> dict:
        self.epoch_skipped = 0
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.epoch)
        if self.cfg.method == "draft":
            return self._draft_epoch()
        cfg, ddpo = self.cfg, self.cfg.ddpo
        scheduler = self.pipe.scheduler

        # ---- 1. sampling
        self.unet.eval()
        batches = []
        window = self._stochastic_window()
        for _ in range(ddpo.sample_batches):
            with torch.no_grad():
                prompt, taste, z, traj = self._sample_batch(
                    ddpo.sample_batch_size, stochastic=window
                )
            # ---- 2. rewards: each image scored by the head for the taste it was asked for
            with torch.no_grad():
                reward = self._reward(traj.images, z, taste)
            self._check_finite(reward, "reward")
            batches.append((prompt, taste, traj, reward, z))

        # ---- 3. advantages, per (prompt, taste), with statistics gathered over all processes
        prompt = torch.cat([b[0] for b in batches])
        taste = torch.cat([b[1] for b in batches])
        reward = torch.cat([b[3] for b in batches]).float()
        mean, std = self._key_stats(prompt, taste, reward, ddpo.stat_fallback)
        advantages = ((reward - mean) / std).clamp(-ddpo.adv_clip_max, ddpo.adv_clip_max)
        n = len(reward)

        latents = torch.cat([b[2].latents for b in batches])  # [N, T + 1, C, h, w]
        old_log_probs = torch.cat([b[2].log_probs for b in batches])  # [N, T]
        embeds = torch.cat([b[2].prompt_embeds for b in batches])
        negative = torch.cat([b[2].negative_embeds for b in batches])
        z_all = None if self.tastes is None else torch.cat([b[4] for b in batches])
        timesteps = batches[0][2].timesteps
        trainable = trainable_step_mask(scheduler, timesteps, cfg.sampling.eta)
        if window is not None:
            trainable &= window.to(trainable.device)
        trainable = trainable.nonzero().flatten()
        n_train_steps = max(1, int(math.ceil(ddpo.timestep_fraction * len(trainable))))

        # ---- 4. training: PPO-clipped ratio of new to old log-probs, summed over the steps
        # of `gradient_accumulation` minibatches per optimizer step. Statistics stay on the
        # device until the epoch ends: a `.item()` per step would wait for the GPU each time.
        self.unet.train()
        names = ["loss", "approx_kl", "clipfrac"] + (["kl_to_base"] if ddpo.kl_weight > 0 else [])
        totals = {name: torch.zeros((), device=self.device) for name in names}

        def step_log_prob(rows, rows_cpu, j):
            """The policy's noise prediction and log-prob of step j for sample rows, as the
            update computes them (train mode, autograd on)."""
            z = None if z_all is None else self._policy_taste(z_all[rows], taste[rows_cpu])
            return self.step_log_prob(
                latents[rows, j],
                latents[rows, j + 1],
                timesteps[j],
                embeds[rows],
                negative[rows],
                z,
            )

        first_order = self._update_order(n)  # the later inner epochs draw theirs when they start
        if ddpo.old_log_probs == "update":
            # the behaviour policy's log-probs from the update's own arithmetic (its graph, its
            # minibatches), before any optimizer step: a compiled or bf16 UNet whose sampler
            # runs other kernels then starts every update at a ratio of exactly 1
            sampled, old_log_probs = old_log_probs, old_log_probs.clone()
            for start in range(0, n, ddpo.train_batch_size):
                rows_cpu = first_order[start : start + ddpo.train_batch_size]
                rows = rows_cpu.to(self.device)
                for j in trainable.tolist():
                    old_log_probs[rows, j] = step_log_prob(rows, rows_cpu, j)[1].detach()
            # what the sampler's arithmetic would have put the first update off by
            gap = (old_log_probs - sampled)[:, trainable].abs().max()
        else:
            # before the first optimizer step the policy is the one that sampled, so any
            # difference between the recomputed and the stored log-probs is arithmetic
            gap = torch.zeros((), device=self.device)
        n_terms, updates, accumulate = 0, 0, ddpo.gradient_accumulation
        for inner in range(ddpo.inner_epochs):
            order = first_order if inner == 0 else self._update_order(n)
            starts = list(range(0, n, ddpo.train_batch_size))
            for m, start in enumerate(starts):
                first = m - m % accumulate  # this optimizer step's first minibatch
                group = min(accumulate, len(starts) - first)  # the last one may be shorter
                if m == first:
                    self.optimizer.zero_grad(set_to_none=True)
                rows_cpu = order[start : start + ddpo.train_batch_size]
                rows = rows_cpu.to(self.device)
                steps = trainable[
                    torch.randperm(len(trainable), generator=self.generator)[:n_train_steps]
                ]
                for j in steps.tolist():
                    # per step: each backward frees its graph, the null taste's included
                    noise_pred, log_prob = step_log_prob(rows, rows_cpu, j)
                    ratio = torch.exp(log_prob - old_log_probs[rows, j])
                    adv = advantages[rows]
                    clipped = torch.clamp(ratio, 1 - ddpo.clip_range, 1 + ddpo.clip_range)
                    loss = torch.maximum(-adv * ratio, -adv * clipped).mean()
                    if ddpo.kl_weight > 0:
                        kl = self._kl_to_base(
                            noise_pred, latents[rows, j], timesteps[j], embeds[rows], negative[rows]
                        )
                        loss = loss + ddpo.kl_weight * kl
                        totals["kl_to_base"] += kl.detach()
                    self.accelerator.backward(loss / (len(steps) * group))
                    totals["loss"] += loss.detach()
                    log_ratio = (log_prob - old_log_probs[rows, j]).detach()
                    if updates == 0 and ddpo.old_log_probs == "sampler":
                        gap = torch.maximum(gap, log_ratio.abs().max())
                    totals["approx_kl"] += 0.5 * (log_ratio**2).mean()
                    totals["clipfrac"] += ((ratio - 1).abs() > ddpo.clip_range).float().mean()
                    n_terms += 1
                if m == first + group - 1:
                    self._optimizer_step()
                    updates += 1
        stats = {name: [value.item() / n_terms] for name, value in totals.items()}
        stats["optimizer_steps"] = [updates]
        stats["logprob_gap"] = [self._check_logprob_gap(gap.item())]
        return self._epoch_log(reward, taste, torch.cat([b[2].images for b in batches]), stats)

    def policy_noise(self, x_t, t, embeds, negative, z) -> torch.Tensor:
        """The policy's classifier-free-guided noise prediction at step t, in
        `self.precision()` (`z`: the tastes as the policy reads them; autograd as the caller
        has it)."""
        with self.precision():
            return guided_noise(
                self.unet,
                self.conditioner,
                x_t,
                t,
                embeds,
                negative,
                z,
                self.cfg.sampling.guidance_scale,
            )

    def step_log_prob(self, x_t, x_prev, t, embeds, negative, z):
        """The policy's guided noise prediction at step t (`policy_noise`) and the log-prob of
        stepping from x_t to the stored x_prev, as DDPO's update computes them."""
        noise_pred = self.policy_noise(x_t, t, embeds, negative, z)
        _, log_prob = ddim_step_with_logprob(
            self.pipe.scheduler, noise_pred, t, x_t, eta=self.cfg.sampling.eta, prev_sample=x_prev
        )
        return noise_pred, log_prob

    def _update_order(self, n: int) -> torch.Tensor:
        """The epoch's n sample rows in the order the update's minibatches take them: shuffled
        rows, or (`ddpo.shuffle=batches`) whole sampling batches in shuffled order."""
        ddpo = self.cfg.ddpo
        if ddpo.shuffle == "rows":
            return torch.randperm(n, generator=self.generator)
        size = ddpo.sample_batch_size
        batches = torch.randperm(n // size, generator=self.generator)
        return (batches[:, None] * size + torch.arange(size)).flatten()

    def _check_logprob_gap(self, gap: float) -> float:
        """Warn (once per run) when the first update's recomputed log-probs differ from the
        sampled ones by more than `clip_range`: PPO would clip updates the policy never made."""
        clip = self.cfg.ddpo.clip_range
        if gap > clip and self.cfg.ddpo.old_log_probs == "sampler" and not self._warned_gap:
            self._warned_gap = True
            warnings.warn(
                f"DDPO: the update recomputes log-probs {gap:.2e} away from the sampler's, more "
                f"than clip_range={clip:g}; train on whole sampling batches (ddpo.shuffle="
                f"batches, ddpo.train_batch_size=ddpo.sample_batch_size), take the old "
                f"log-probs from the update (ddpo.old_log_probs=update, e.g. with "
                f"compile_unet=true) or use mixed_precision=no",
                stacklevel=2,
            )
        return gap

    def reward_keys(self, prompt, taste):
        """The reward history's key of each (prompt index, taste index) pair: one key per
        (prompt, taste, asked for the null taste), taste indices of null rows raised by the
        number of tastes (see `draw_batch`). Tensors or arrays, elementwise."""
        return prompt * 2 * len(self.taste_names) + taste

    def _key_stats(self, prompt, taste, reward, fallback: str = "batch"):
        """Each sample's (prompt, taste) key's running reward (mean, std), [B] each, from the
        rewards of every process (gathered, so all ranks normalise alike). A key seen too rarely
        uses its taste's statistics (`fallback="taste"`) or the batch's."""
        keys = self.reward_keys(prompt, taste).to(self.device)
        all_keys = self.accelerator.gather(keys).cpu().numpy()
        all_rewards = self.accelerator.gather(reward.float()).cpu().numpy()
        groups = None  # the same config on every rank: all gather alike
        if fallback == "taste":
            groups = self.accelerator.gather(taste.to(self.device)).cpu().numpy()
        mean, std = self.tracker.observe(all_keys, all_rewards, groups)
        n, rank = len(reward), self.accelerator.process_index
        mine = slice(rank * n, (rank + 1) * n)
        return tuple(
            torch.tensor(a[mine], dtype=torch.float32, device=self.device) for a in (mean, std)
        )

    def _kl_to_base(self, noise_pred, x_t, t, embeds, negative) -> torch.Tensor:
        """KL between the policy's and the base model's Gaussian step at x_t (adapter disabled)."""
        eta = self.cfg.sampling.eta
        scheduler = self.pipe.scheduler
        with torch.no_grad(), disable_adapters(self.unet), self.precision():
            base_pred = guided_noise(
                self.unet, None, x_t, t, embeds, negative, None, self.cfg.sampling.guidance_scale
            )
        mean, std = ddim_posterior(scheduler, noise_pred, t, x_t, eta)
        base_mean, _ = ddim_posterior(scheduler, base_pred, t, x_t, eta)
        return (((mean - base_mean) ** 2) / (2 * std**2)).mean()

    def _draft_epoch(self) -> dict:
        """Reward backpropagation through the last K denoising steps and the decoder."""
        draft = self.cfg.draft
        self.unet.train()
        rewards, tastes, images, losses, kls, sims = [], [], [], [], [], []
        for _ in range(draft.steps_per_epoch):
            prompt, taste, z, traj = self._sample_batch(self._draft_batch(), draft.last_k_steps)
            # the reward for taste z, differentiable all the way back to the LoRA
            reward = self._reward(traj.images, z, taste)
            self._check_finite(reward, "reward")
            if draft.normalize:
                # the batch's std for a rare key, whatever DDPO's advantages fall back to: DRaFT's
                # normalisation was measured with it (see benchmarks/RESULTS.md)
                _, std = self._key_stats(prompt, taste, reward.detach())
                loss = -(reward / std).mean()
            else:
                loss = -reward.mean()
            if draft.kl_weight > 0:
                kl = self._draft_kl(traj, self._policy_taste(z, taste))
                kls.append(kl.detach())
                loss = loss + draft.kl_weight * kl
            if draft.diversity_weight > 0:
                if self.base_similarity is None:
                    similarity = self._within_taste_similarity(traj.images, taste)
                    sims.append(similarity.detach())
                else:  # each taste's looks, up to the base's variety
                    per_taste = self._within_taste_similarity(traj.images, taste, per_taste=True)
                    sims.append(per_taste.detach().mean())
                    similarity = (per_taste - self.base_similarity).clamp(min=0).mean()
                loss = loss + draft.diversity_weight * similarity
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            self._optimizer_step()
            rewards.append(reward.detach())
            tastes.append(taste)
            images.append(traj.images.detach())
            losses.append(loss.item())
        stats = {
            "loss": losses,
            "kl_to_base": [k.item() for k in kls],
            "within_taste_similarity": [s.item() for s in sims],
        }
        return self._epoch_log(torch.cat(rewards), torch.cat(tastes), torch.cat(images), stats)

    def _within_taste_similarity(self, images, taste, per_taste: bool = False) -> torch.Tensor:
        """Mean CLIP cosine similarity between distinct images of the batch asked for the same
        taste (differentiable; 1 = one look): over all such pairs, or per_taste [T], one mean
        for each taste with two images or more."""
        features = torch.nn.functional.normalize(self.rewards.features(images), dim=1)  # [B, D]
        taste = taste.to(features.device)
        same = taste[:, None].eq(taste[None, :])
        same.fill_diagonal_(False)
        if not same.any():
            return features.new_zeros(1 if per_taste else ())
        similarity = features @ features.T
        if not per_taste:
            return similarity[same].mean()
        return torch.stack(
            [similarity[same & (taste[:, None] == t)].mean() for t in taste[same.any(1)].unique()]
        )

    def _draft_kl(self, traj, z) -> torch.Tensor:
        """KL to the base model at one random denoising step before the backpropagated ones,
        with gradient: the earlier steps set an image's layout, which the reward's gradient
        through the last step never sees, and it is there that a policy collapses to one look."""
        n_free = len(traj.timesteps) - self.cfg.draft.last_k_steps
        j = int(torch.randint(max(1, n_free), (1,), generator=self.generator))
        x_t, t = traj.latents[:, j], traj.timesteps[j]
        embeds, negative = traj.prompt_embeds, traj.negative_embeds
        noise_pred = self.policy_noise(x_t, t, embeds, negative, z)
        return self._kl_to_base(noise_pred, x_t, t, embeds, negative)

    def _optimizer_step(self):
        """Average the gradients over processes, unscale (fp16) and clip them, step.

        fp16: a step whose gradients overflowed is skipped by accelerate's loss scaler (which
        then lowers the scale), as every rank holds the same averaged gradients; without a
        scaler a non-finite gradient stops the run.
        """
        acc = self.accelerator
        if acc.num_processes > 1:
            # LoRA and taste parameters live outside any DDP wrapper: average their gradients
            # explicitly, in one all-reduce of all of them, so every process takes the same step.
            grads = [p.grad for p in self.params if p.grad is not None]
            flat = acc.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
        norm = acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)  # unscales fp16 first
        if acc.scaler is None:
            self._check_finite(norm, "gradient", collective=False)  # the same on every rank
        self.optimizer.step()
        if not self.optimizer.step_was_skipped:
            self.skipped_steps = 0
            return
        self.skipped_steps += 1
        self.epoch_skipped += 1
        if self.skipped_steps >= MAX_SKIPPED_STEPS:
            raise UserError(
                f"non-finite gradient on {self.skipped_steps} fp16 steps in a row at epoch "
                f"{self.epoch}; use mixed_precision=bf16 or lower lr (earlier checkpoints are intact)"
            )

    def _check_finite(self, x: torch.Tensor, what: str, collective: bool = True):
        """Stop the run with a one-line error if `x` is not all finite. `collective`: on every
        process at once (each contributes its flag), so no rank raises alone while the others
        wait for it in the next gather; every rank calls it at the same point."""
        ok = torch.isfinite(x).all()
        if collective and self.accelerator.num_processes > 1:
            ok = self.accelerator.gather(ok.reshape(1).float()).min() > 0
        if not ok:
            raise UserError(
                f"non-finite {what} at epoch {self.epoch}; lower lr or check the reward heads "
                "(earlier checkpoints are intact)"
            )

    def _epoch_log(self, reward, taste, images, stats) -> dict:
        log = {
            "epoch": self.epoch,
            "reward_mean": reward.mean().item(),
            "reward_std": reward.std().item(),
        }
        for name, values in stats.items():
            if values:
                log[name] = float(np.mean(values))
        per_taste = {}
        gold = self.gold_fn(images.float().cpu()) if self.gold_fn is not None else None  # [B, K]
        for i, name in enumerate(self.taste_names):
            mask = (taste == i).cpu()
            if mask.any():
                entry = {"reward": reward.cpu()[mask].mean().item(), "n": int(mask.sum())}
                if (
                    gold is not None
                    and self.tastes is not None
                    and self.cfg.taste.source != "raters"
                ):
                    entry["gold"] = gold[mask, i].mean().item()
                per_taste[name] = entry
        log["per_taste"] = per_taste
        if self.accelerator.scaler is not None:
            log["skipped_steps"] = self.epoch_skipped  # fp16 overflows
        if gold is not None:
            log["gold_per_cluster"] = gold.mean(dim=0).tolist()
        if self.maxmin is not None:  # running standardised reward per cluster
            log["maxmin_estimate"] = self.maxmin.estimate.tolist()
        return log

    # ------------------------------------------------------------------ checkpoints
    def _random_state(self) -> dict[str, torch.Tensor]:
        """This process's random state and pending grouped samples, as tensors."""
        prompt, taste, noise = self.pending
        state = {
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "pending_prompt": prompt,
            "pending_taste": taste,
            "pending_noise": noise,
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self, directory: Path) -> None:
        """Policy (LoRA + taste module, loadable by diffusers) and training state, atomically.

        Every process must call it (each contributes its random state); the main one writes.
        """
        per_rank = gather_per_rank(self.accelerator, self._random_state())
        if not self.accelerator.is_main_process:
            return
        optimizer, tensors = optimizer_to_plain(self.optimizer.state_dict())
        scaler = self.accelerator.scaler
        plain = {
            "epoch": self.epoch,
            "num_processes": self.accelerator.num_processes,
            "optimizer": optimizer,
            "grad_scaler": None if scaler is None else scaler.state_dict(),
            "skipped_steps": self.skipped_steps,
            "tracker": self.tracker.state_dict(),
            "maxmin": None if self.maxmin is None else self.maxmin.state_dict(),
            "history": self.history,
        }
        with atomic_dir(directory) as tmp:
            self.policy.save_pretrained(
                tmp / POLICY_DIR, metadata={"epoch": self.epoch, "objective": self.cfg.objective}
            )
            write_state(tmp, plain, {**tensors, **per_rank})

    def resume(self, directory: Path) -> None:
        self._check_expert_layout(directory)
        _, conditioner = load_checkpoint(directory / POLICY_DIR, self.unet)
        if (conditioner is None) != (self.conditioner is None):
            raise UserError(
                f"{directory}: checkpoint objective does not match objective={self.cfg.objective}"
            )
        if conditioner is not None:
            self.conditioner.load_state_dict(conditioner.state_dict())
        plain, tensors = read_state(directory)
        self.optimizer.load_state_dict(optimizer_from_plain(plain["optimizer"], tensors))
        if self.accelerator.scaler is not None and plain["grad_scaler"] is not None:
            self.accelerator.scaler.load_state_dict(plain["grad_scaler"])
        self.skipped_steps = plain["skipped_steps"]
        self.tracker.load_state_dict(plain["tracker"])
        if self.maxmin is not None:
            self.maxmin.load_state_dict(plain["maxmin"])
        self.history = plain["history"]
        self.epoch = plain["epoch"]
        rank, saved = self.accelerator.process_index, plain["num_processes"]
        if saved != self.accelerator.num_processes:
            warnings.warn(
                f"{directory} was written by {saved} processes and is resumed by "
                f"{self.accelerator.num_processes}: the run goes on, but draws other samples "
                "than an uninterrupted one would",
                stacklevel=2,
            )
        if rank >= saved:
            return  # a process the checkpoint has no random state for keeps its fresh seed
        mine = rank_tensors(tensors, rank)
        self.generator.set_state(mine["generator"])
        torch.set_rng_state(mine["torch_rng"])
        if "cuda_rng" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        self.pending = (mine["pending_prompt"], mine["pending_taste"], mine["pending_noise"])

    def _check_expert_layout(self, directory: Path) -> None:
        """A checkpoint resumes only into the layout it was trained with: a shared LoRA block,
        and a taste module per cluster, or not (DRaFT's defaults had a shared block and one
        taste module until 2026-11-29, so a run started before resumes with both set)."""
        path = directory / POLICY_DIR / TASTE_DIR / CONFIG_NAME
        if self.conditioner is None or not path.is_file():
            return
        saved = read_json(path)
        for field, option in (
            ("shared_expert", "lora.shared_expert"),
            ("expert_tokens", "conditioning.expert_tokens"),
        ):
            was = bool(saved.get(field))
            if was != bool(getattr(self.conditioner.config, field)):
                raise UserError(
                    f"{directory} was trained with {option}={str(was).lower()}; resume it with "
                    f"{option}={str(was).lower()}"
                )

    def close(self) -> None:
        """Leave the process group (`fit` has finished the trackers); every process calls it
        once its training is over. A gloo process that leaves its group to interpreter shutdown
        can abort there (`terminate called without an active exception`) and fail a finished
        run. A no-op in a single process."""
        self.accelerator.state.destroy_process_group()

    def fit(self, resume: bool = False, progress: bool = True) -> list[dict]:
        cfg = self.cfg
        ckpt_root = self.out_dir / "checkpoints"
        if resume and any(ckpt_root.glob("epoch-*/trainer_state.pt")):
            raise UserError(
                f"{ckpt_root} holds checkpoints of an older version (trainer_state.pt), which "
                "cannot be resumed; train into a new out_dir (their policy/ still loads)"
            )
        if resume and (latest := latest_checkpoint(ckpt_root)) is not None:
            self.resume(latest)
            if self.accelerator.is_main_process:  # the log holds exactly the resumed history
                lines = "".join(json.dumps(h) + "\n" for h in self.history)
                (self.out_dir / "log.jsonl").write_text(lines)
        if cfg.tensorboard:
            self.accelerator.init_trackers("tensorboard")
        bar = tqdm(
            total=cfg.n_epochs,
            initial=self.epoch,
            desc=f"{cfg.objective} ({cfg.method})",
            disable=not progress or not self.accelerator.is_main_process,
        )
        while self.epoch < cfg.n_epochs:
            t0 = time.perf_counter()
            log = self.train_epoch()
            if self._restart_due(self.epoch + 1):
                log["restart"] = self.restart_experts()
                if self.accelerator.is_main_process:
                    for name, source in log["restart"]["restarted"].items():
                        tqdm.write(
                            f"{name}'s expert restarted from {source}'s after epoch {self.epoch + 1}"
                        )
            log["seconds"] = round(time.perf_counter() - t0, 2)
            self.history.append(log)
            if cfg.tensorboard:
                self.accelerator.log(_flat_scalars(log), step=self.epoch)
            self.epoch += 1
            if self.accelerator.is_main_process:
                with open(self.out_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(log) + "\n")
            if self.epoch % cfg.checkpoint_every == 0 or self.epoch == cfg.n_epochs:
                self.save(ckpt_root / f"epoch-{self.epoch:04d}")  # every rank: its random state
            bar.set_postfix(reward=f"{log['reward_mean']:.3f}")
            bar.update(1)
        bar.close()
        if cfg.select_experts and cfg.objective == "matched":
            self.select_experts(ckpt_root, progress)
        for tracker in self.accelerator.trackers:  # flushed; the process group stays (`close`)
            tracker.finish()
        if self.accelerator.is_main_process:
            write_json(self.out_dir / "history.json", {"history": self.history})
        return self.history

    # ------------------------------------------------------------------ expert selection
    @torch.no_grad()
    def held_out_images(self, taste: int | None) -> torch.Tensor:
        """`select_images` images asked for taste `taste` on fixed prompts and noise that
        training never draws (the same on every call and every process, so checkpoints are
        compared on the same draws); taste None: the base model's (the LoRA off, no taste)."""
        n = self.cfg.select_images
        generator = torch.Generator().manual_seed(self.cfg.seed + 104729)
        prompt = torch.arange(n) % len(self.cfg.prompts)
        noise = torch.randn((n, *self._latent_shape()), generator=generator).to(self.device)
        embeds, negative = self._embeds(prompt)
        base = taste is None
        policy = (
            TastePolicy(self.pipe, None, sampling=self.policy.sampling) if base else self.policy
        )
        adapters = disable_adapters(self.unet) if base else contextlib.nullcontext()
        z = None if base else self.tastes[torch.full((n,), taste, device=self.tastes.device)]
        with self.precision(), adapters:
            traj = policy.sample(
                prompt_embeds=embeds,
                negative_embeds=negative,
                tastes=z,
                noise=noise,
                generator=generator,
            )
        return traj.images

    def held_out_base_reward(self, taste: int) -> float:
        """`held_out_reward` of the base model's held-out images for `taste`: the base and the
        draws never change, so they are sampled and scored once per run."""
        if self._held_out_base is None:
            images = self.held_out_images(None)
            self._held_out_base = [
                self.held_out_reward(k, images) for k in range(len(self.taste_names))
            ]
        return self._held_out_base[taste]

    @torch.no_grad()
    def held_out_reward(
        self, taste: int, images: torch.Tensor | None = None, features: torch.Tensor | None = None
    ) -> float:
        """Mean reward for taste `taste`, by its own head, of `images` (default: the policy's
        `held_out_images` for that taste; `features`: theirs, when already encoded)."""
        images = self.held_out_images(taste) if images is None else images
        index = torch.full((len(images),), taste)
        z = self.tastes[index.to(self.tastes.device)]
        return self._reward(images, z, index, features).mean().item()

    @torch.no_grad()
    def held_out_scores(self, taste: int) -> tuple[float, float]:
        """(`held_out_reward`, Vendi score of the same images' CLIP features) of the policy's
        `held_out_images` for `taste`: how well its own head rates them, and how many looks."""
        images = self.held_out_images(taste)
        with torch.autocast(self.device.type, enabled=False):
            features = self.rewards.features(images.float())
        return self.held_out_reward(taste, images, features), vendi_score(features)

    def _restart_due(self, epoch: int) -> bool:
        """Whether the `restart_experts` check runs after `epoch` (counted from 1)."""
        cfg = self.cfg
        return (
            cfg.restart_experts
            and cfg.objective == "matched"
            and epoch % cfg.restart_every == 0
            and epoch <= cfg.restart_until * cfg.n_epochs
        )

    def restart_experts(self) -> dict:
        """Every taste's head on every taste's held-out images (and the base model's); a taste
        whose own images lag another's on its own head takes that taste's expert block, Adam
        moments included (`plural_diffusion.expert_selection.lagging_experts`). The same
        draws on every process, so every rank decides alike. Returns the scores and restarts."""
        self.unet.eval()
        names, n = self.taste_names, len(self.taste_names)
        base = [self.held_out_base_reward(k) for k in range(n)]
        scores = []
        for j in range(n):
            images = self.held_out_images(j)
            scores.append([self.held_out_reward(k, images) for k in range(n)])
        cfg = self.cfg
        restarts = lagging_experts(
            scores, base, cfg.restart_ratio, self.head_spread, cfg.restart_min_gap
        )
        if restarts:
            state = self.optimizer.optimizer.state  # accelerate's wrapper holds torch's
            tensors = []
            for name, param in unwrap(self.unet).named_parameters():
                kind = "A" if ".lora_A." in name else "B" if ".lora_B." in name else None
                if kind is None:
                    continue
                tensors.append((kind, param.data))
                tensors += [(kind, m) for m in _moments(state, param)]
            copy_expert_block(tensors, restarts, self.cfg.lora.rank)
            if self.conditioner is not None and self.conditioner.config.expert_tokens:
                self._copy_taste_modules(restarts, state)
            if cfg.method == "ddpo":
                self._forget_rewards(list(restarts))
        return {
            "held_out_reward": {names[j]: dict(zip(names, row)) for j, row in enumerate(scores)},
            "base": dict(zip(names, base)),
            "restarted": {names[k]: names[j] for k, j in restarts.items()},
        }

    def _forget_rewards(self, tastes: list[int]) -> None:
        """Drop the reward history of each (prompt, taste) key of `tastes`, and of the taste
        (`_key_stats`' keys and groups). A restarted taste's rewards jump to the other expert's
        level, and DDPO centres each reward on its key's history: against the old, lower mean
        nearly every advantage is positive for as long as the history holds old rewards (32
        epochs of a matched key on the toy config), and the update reinforces whatever the
        expert sampled. Measured on the toy base of seed 5: vivid restarted from sunny's expert
        13 times, every check from epoch 3 to 27, and ended at gold .19 (see
        benchmarks/RESULTS.md). Reward backpropagation only divides by the key's std, and keeps
        it."""
        prompts = range(len(self.cfg.prompts))
        self.tracker.forget([self.reward_keys(p, k) for p in prompts for k in tastes], tastes)

    @torch.no_grad()
    def _copy_taste_modules(self, restarts: dict[int, int], state: dict) -> None:
        """With `conditioning.expert_tokens`, a restarted taste takes the other's taste module
        too (weights and Adam moments): its expert is both its LoRA block and its tokens."""
        params = [
            list(self.conditioner.expert_module(k).parameters())
            for k in range(len(self.taste_names))
        ]
        sources = {  # all read before any is written (two tastes may swap)
            j: [[t.clone() for t in (p, *_moments(state, p))] for p in params[j]]
            for j in set(restarts.values())
        }
        for k, j in restarts.items():
            for p, saved in zip(params[k], sources[j]):
                for t, v in zip((p, *_moments(state, p)), saved):
                    t.copy_(v)

    def select_experts(self, ckpt_root: Path, progress: bool = True) -> dict:
        """Give each taste its expert block from the checkpoint under `ckpt_root` where its
        held-out reward is highest (`plural_diffusion.expert_selection`). With
        `conditioning.expert_tokens` the taste's module comes from the same checkpoint as its
        block: the two were trained together, and a block scored with another epoch's module is
        not the policy that checkpoint held (on the toy base of seed 3, sunny's module collapsed
        in the last epochs and every block scored low beside it). The shared block and the
        shared part of the conditioner stay the last epoch's. Writes `ckpt_root/selected` (a
        checkpoint's policy/ and selection.json) and out_dir/selection.json; returns the
        selection."""
        self.unet.eval()
        last = f"epoch-{self.epoch:04d}"
        candidates = {
            p.name: read_lora_state(p / POLICY_DIR)
            for p in sorted(ckpt_root.glob("epoch-*"))
            if (p / STATE_JSON).is_file() and p.name != last
        }
        # a taste restarted from another's expert (`restart_experts`) after epoch e: its block
        # in checkpoints up to e is another expert's or its own former one, no candidate
        restarted = {
            name: h["epoch"] + 1
            for h in self.history
            for name in h.get("restart", {}).get("restarted", {})
        }
        rank = self.cfg.lora.rank
        current = lora_state(self.unet)
        # with per-taste modules, each candidate's, to go with its block; else the shared
        # module stays the last epoch's
        modules, current_modules = {}, None
        if self.conditioner is not None and self.conditioner.config.expert_tokens:
            modules = {
                name: self._taste_module_states(
                    load_taste_conditioner(ckpt_root / name / POLICY_DIR / TASTE_DIR)
                )
                for name in candidates
            }
            current_modules = self._taste_module_states(self.conditioner)
        selection = {}
        bar = tqdm(
            total=len(self.taste_names) * (len(candidates) + 1),
            desc="select experts",
            disable=not progress or not self.accelerator.is_main_process,
        )
        for k, name in enumerate(self.taste_names):
            base = self.held_out_base_reward(k)
            set_lora_state(self.unet, current)
            self._set_taste_modules(current_modules)
            scores, variety = {}, {}
            scores[last], variety[last] = self.held_out_scores(k)
            bar.update(1)
            for ckpt, state in candidates.items():
                if int(ckpt.split("-")[1]) <= restarted.get(name, 0):
                    bar.update(1)
                    continue
                set_lora_state(self.unet, with_expert_block(current, state, k, rank))
                if current_modules is not None:
                    self._set_taste_modules({k: modules[ckpt][k]})
                scores[ckpt], variety[ckpt] = self.held_out_scores(k)
                bar.update(1)
            best = pick_varied(
                scores,
                variety,
                keep=last,
                base=base,
                min_gain=self.cfg.select_min_gain,
                looks=self.cfg.looks_share,
            )
            if best != last:
                current = with_expert_block(current, candidates[best], k, rank)
                if current_modules is not None:
                    current_modules[k] = modules[best][k]
            selection[name] = {
                "checkpoint": best,
                "held_out_reward": scores,
                "held_out_vendi": variety,
                "base": base,
            }
        bar.close()
        set_lora_state(self.unet, current)
        self._set_taste_modules(current_modules)
        if self.accelerator.is_main_process:
            with atomic_dir(ckpt_root / SELECTED_DIR) as tmp:
                self.policy.save_pretrained(
                    tmp / POLICY_DIR,
                    metadata={
                        "epoch": self.epoch,
                        "objective": self.cfg.objective,
                        "experts_from": {n: v["checkpoint"] for n, v in selection.items()},
                    },
                )
                write_json(tmp / "selection.json", selection)
            write_json(self.out_dir / "selection.json", selection)
        return selection

    def _taste_module_states(
        self, conditioner: TasteConditioner
    ) -> dict[int, dict[str, torch.Tensor]]:
        """{taste: a copy of its module's state} of a conditioner with `expert_tokens`."""
        return {
            k: {n: t.detach().clone() for n, t in conditioner.expert_module(k).state_dict().items()}
            for k in range(len(self.taste_names))
        }

    @torch.no_grad()
    def _set_taste_modules(self, modules: dict[int, dict[str, torch.Tensor]] | None) -> None:
        """Load {taste: module state} into the trainer's conditioner (None: leave it)."""
        for k, state in (modules or {}).items():
            self.conditioner.expert_module(k).load_state_dict(state)


def final_checkpoint(root: Path) -> Path | None:
    """The run's policy to use: `root/selected` when `select_experts` wrote one after the
    newest complete checkpoint's epoch, else that checkpoint (a selection left by a shorter
    run that training then extended without selecting is stale)."""
    latest = latest_checkpoint(root)
    info = root / SELECTED_DIR / POLICY_DIR / CHECKPOINT_JSON
    if latest is None or not info.is_file():
        return latest
    selected_epoch = read_json(info).get("metadata", {}).get("epoch")
    latest_epoch = read_json(latest / STATE_JSON).get("epoch")
    return root / SELECTED_DIR if selected_epoch == latest_epoch else latest


def _flat_scalars(log: dict, prefix: str = "") -> dict[str, float]:
    """{'per_taste': {'noir': {'reward': 1.0}}} -> {'per_taste/noir/reward': 1.0}, for trackers."""
    out = {}
    for key, value in log.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and key != "epoch":
            out[name] = float(value)
    return out


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (incomplete ones never get their final name)."""
    done = sorted(p for p in root.glob("epoch-*") if (p / STATE_JSON).is_file())
    return done[-1] if done else None


def train(cfg: TrainConfig, resume: bool = False, gold_fn=None, progress: bool = True) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg))
    if not resume and (out / "log.jsonl").exists():
        (out / "log.jsonl").unlink()
    trainer = Trainer(cfg, gold_fn=gold_fn)
    try:
        trainer.fit(resume=resume, progress=progress)
    finally:
        trainer.close()
    return out


def _moments(state: dict, param: torch.Tensor) -> list[torch.Tensor]:
    """The optimizer's per-element state of `param` (Adam's two moments), not its step count."""
    return [
        v for v in state.get(param, {}).values() if torch.is_tensor(v) and v.shape == param.shape
    ]
