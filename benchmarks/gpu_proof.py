"""Stable Diffusion 1.5 on one GPU, measured through the trainer's own code, offline.

Builds a random-weight SD 1.5 (full widths 320/640/1280/1280, `plural_diffusion.sd15_random`)
and a random-weight open_clip ViT-L-14 (no download: `pretrained=None`), trains reward heads on
the toy world's ratings through it, then runs `configs/sd15.yaml` with `Trainer`, `sample` and
`ddim_step_with_logprob` and writes `benchmarks/results/gpu_proof.json`: the card; the dtypes of
UNet, VAE, LoRA and taste module; the attention kernel; peak memory and seconds per phase
(sampling 8 images x 50 steps, decode, reward, a DDPO minibatch with and without UNet
checkpointing, a DRaFT-1 step with and without VAE checkpointing); seconds per epoch at
sd15.yaml's settings; the trainer's sampler against `StableDiffusionPipeline.__call__`; the UNet's
TFLOP/s against the card's bf16 peak; |log_prob(train) - log_prob(sample)| at the first update
in bf16, fp16 and fp32 against `clip_range`; the reward in bf16 against float32; fp16 gradients.
Each phase is recorded on its own: one that fails is written as its error, the rest still run.

    python benchmarks/gpu_proof.py                    # on a GPU, ~5 minutes on an H100
    python benchmarks/gpu_proof.py --smoke            # tiny sizes on the CPU: does it run?
    python benchmarks/gpu_proof.py --phases sampling,ddpo_minibatch   # a subset
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import platform
import shlex
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import open_clip
import torch

from plural_diffusion.backbone import add_lora
from plural_diffusion.conditioning import TasteConditioner, unet_forward
from plural_diffusion.configs import CONFIGS
from plural_diffusion.ddim import trainable_step_mask
from plural_diffusion.ddpo import Trainer
from plural_diffusion.demo import DemoConfig
from plural_diffusion.sampling import decode_images
from plural_diffusion.sd15_random import SD15_CPU, SD15_FULL, save_sd15_random
from plural_diffusion.toyworld.clip import CONFIG_FILE, WEIGHTS_FILE, register_toy_clip
from plural_diffusion.toyworld.prepare import prepare_toy
from plural_diffusion.train_config import TrainConfig
from reward_models.config import load_config
from reward_models.io import save_tensors, write_json
from reward_models.workflow import RewardTrainConfig
from reward_models.workflow import train as train_rewards

RESULTS = Path(__file__).resolve().parent / "results"
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
# Matched in this order, as substrings of torch.cuda.get_device_name ("NVIDIA H100 PCIe").
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "4090": 165.2,
}
PHASES = (
    "dtypes",
    "attention",
    "sampling",
    "decode",
    "reward",
    "ddpo_minibatch",
    "draft_step",
    "unet_variants",
    "epochs",
    "logprob_gap_sources",
    "draft_epoch",
    "sampler_vs_pipeline",
    "unet_tflops",
    "log_prob_by_precision",
    "reward_precision",
    "fp16_gradients",
    "cuda_generators",
    "unet_compile",
)


def bf16_peak(card: str) -> float | None:
    for name, peak in BF16_PEAK_TFLOPS.items():
        if name in card:
            return peak
    return None


def error_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class Proof:
    """The JSON being written, and the phases' measurement and error handling."""

    def __init__(
        self, out: Path, device: torch.device, phases: set[str], minibatch_steps: int, epochs: int
    ):
        self.out, self.device, self.phases = out, device, phases
        self.minibatch_steps = minibatch_steps
        self.epochs = epochs  # DDPO epochs the epochs phase trains
        self.cuda = device.type == "cuda"
        self.results: dict = {"phases": {}}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Record the phase's figures (the dict it yields), its seconds and peak memory; an
        exception is recorded as the phase's result and does not stop the other phases."""
        entry: dict = {}
        if not any(name.startswith(wanted) for wanted in self.phases):
            yield None
            return
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            start_bytes = torch.cuda.memory_allocated(self.device)
        self.sync()
        t0 = time.perf_counter()
        try:
            yield entry
        except Exception as e:  # a benchmark harness: record any failure, run the next phase
            entry["error"] = error_line(e)
            entry["traceback"] = traceback.format_exc().splitlines()[-6:]
        self.sync()
        entry.setdefault("seconds", round(time.perf_counter() - t0, 3))
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            entry["peak_gib"] = round(peak / 2**30, 3)
            entry["peak_above_start_gib"] = round((peak - start_bytes) / 2**30, 3)
        self.results["phases"][name] = entry
        self.write()
        print(f"{name}: {json.dumps(entry)[:300]}", flush=True)

    def timed(self, fn, repeats: int = 1) -> tuple[object, float]:
        """fn's last result and its seconds per call (device-synchronised)."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        self.sync()
        return out, (time.perf_counter() - t0) / repeats

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2) + "\n")


# ------------------------------------------------------------------ models and reward heads
def random_clip_dir(out: Path, smoke: bool) -> Path:
    """open_clip's local-dir layout for a random ViT-L-14 (smoke: the toy world's tiny CLIP)."""
    name = "toy-clip" if smoke else "ViT-L-14"
    if smoke:
        register_toy_clip()
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    config = {
        "model_cfg": open_clip.get_model_config(name),
        "preprocess_cfg": open_clip.get_model_preprocess_cfg(model),
    }
    save_tensors(out / WEIGHTS_FILE, model.state_dict())
    write_json(out / CONFIG_FILE, config)
    return out


def reward_run(work: Path, clip_dir: Path, device: str) -> Path:
    """Reward heads on the toy world's ratings, through the given CLIP (features are random
    directions of a random tower: the heads are for shapes and timings, not for taste)."""
    demo = load_config(DemoConfig, CONFIGS / "demo-fast.yaml")
    world = prepare_toy(demo.prepare, root=work / "stages", progress=False, stages=("world",)).world
    cfg = load_config(
        RewardTrainConfig,
        CONFIGS / "reward-toy.yaml",
        [
            f"data.path={world}",
            f"data.rater_info={world / 'raters.csv'}",
            f"clip.model=local-dir:{clip_dir}",
            f"clip.device={device}",
            f"clip.cache_dir={work / 'features'}",
            "train.epochs=10",
            f"out_dir={work / 'rm'}",
        ],
    )
    train_rewards(cfg)
    return work / "rm"


def make_trainer(base: Path, rewards: Path, out: Path, smoke: bool, *overrides: str) -> Trainer:
    """A Trainer on configs/sd15.yaml (smoke: 2 steps at 64 px); a fresh accelerate state, so
    one process can build trainers of several precisions."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    small = ["sampling.steps=2", "resolution=64"] if smoke else []
    cfg = load_config(
        TrainConfig,
        CONFIGS / "sd15.yaml",
        [
            f"base={base}",
            f"rewards={rewards}",
            f"out_dir={out}",
            "tensorboard=false",
            *small,
            *overrides,
        ],
    )
    return Trainer(cfg)


def release() -> None:
    """Free what the caller has just `del`eted (GPU memory back for the next trainer)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ the trainer's steps
def sample_batch(trainer: Trainer, batch: int, grad_last_steps: int = 0):
    with torch.set_grad_enabled(grad_last_steps > 0):
        return trainer._sample_batch(batch, grad_last_steps)


def step_log_probs(
    trainer: Trainer,
    traj,
    rows: torch.Tensor,
    steps: list[int],
    grad: bool,
    enable_grad: bool | None = None,
):
    """The policy's log-probs [len(steps), B] of the stored steps of `rows`, recomputed as the
    DDPO update does (`Trainer.step_log_prob`), for
    the tastes the sampler was given (`traj.taste`: the null taste where taste dropout drew
    it); with `grad` each step's PPO loss (advantage 1) is backpropagated as the update would.
    `enable_grad` (default: `grad`) runs the forward with autograd on, without a backward."""
    out = []
    for j in steps:
        with torch.set_grad_enabled(grad if enable_grad is None else enable_grad):
            _, log_prob = trainer.step_log_prob(
                traj.latents[rows, j],
                traj.latents[rows, j + 1],
                traj.timesteps[j],
                traj.prompt_embeds[rows],
                traj.negative_embeds[rows],
                None if traj.taste is None else traj.taste[rows],
            )
            if grad:
                ratio = torch.exp(log_prob - traj.log_probs[rows, j])
                trainer.accelerator.backward(-ratio.mean() / len(steps))
        out.append(log_prob.detach())
    return torch.stack(out)


def first_step_noise(trainer: Trainer, traj) -> torch.Tensor:
    """The trainer's guided prediction at the first stored step of every row of `traj` (for
    the tastes it was sampled for), no grad, in `trainer.precision()`."""
    with torch.no_grad():
        return trainer.policy_noise(
            traj.latents[:, 0],
            traj.timesteps[0],
            traj.prompt_embeds,
            traj.negative_embeds,
            traj.taste,
        )


def trainable_steps(trainer: Trainer, traj) -> list[int]:
    mask = trainable_step_mask(trainer.pipe.scheduler, traj.timesteps, trainer.cfg.sampling.eta)
    return mask.nonzero().flatten().tolist()


def draft_step(trainer: Trainer, batch: int) -> float:
    """One DRaFT-1 update, as `Trainer._draft_epoch` takes it."""
    _, taste, z, traj = sample_batch(trainer, batch, grad_last_steps=1)
    reward = trainer._reward(traj.images, z, taste)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.accelerator.backward(-reward.mean())
    trainer._optimizer_step()
    return float(reward.detach().mean())


def unet_variants(proof: Proof, trainer: Trainer, base: Path, traj, batch: int) -> dict:
    """Seconds per guided UNet call (2 x batch rows) of the plain base UNet, then with the LoRA,
    then with the taste module attached, each in its own dtype and under torch.autocast: where
    the trainer's UNet call loses time against the plain pipeline's."""
    from plural_diffusion.backbone import load_pipeline

    cfg = trainer.cfg
    unet = load_pipeline(base, dtype=trainer.pipe.unet.dtype, device=proof.device).unet
    unet.requires_grad_(False)
    x = traj.latents[:batch, 0].repeat(2, 1, 1, 1)
    text = torch.cat([traj.negative_embeds[:batch], traj.prompt_embeds[:batch]])
    t = traj.timesteps[0]
    out: dict = {}

    def measure(name: str, unet, conditioner=None, z=None) -> None:
        for autocast in (False, True):

            def forward(autocast=autocast):
                context = trainer.accelerator.autocast() if autocast else contextlib.nullcontext()
                with torch.no_grad(), context:
                    return unet_forward(unet, conditioner, x, t, text, z)

            proof.timed(forward, repeats=2)  # warm-up
            _, seconds = proof.timed(forward, repeats=5)
            out[f"{name}{'_autocast' if autocast else ''}_s"] = round(seconds, 4)

    measure("plain", unet)
    add_lora(unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
    measure("lora", unet)
    conditioner = TasteConditioner.for_unet(trainer.conditioner.config, unet).to(proof.device)
    conditioner.attach(unet)
    z = trainer.tastes.to(proof.device)
    z = z.repeat(2 * batch // len(z) + 1, 1)[: 2 * batch]
    measure("lora_taste", unet, conditioner, z)
    del unet, conditioner
    release()
    return out


def unet_compile(proof: Proof, trainer: Trainer, traj) -> dict:
    """One guided UNet call of the trainer's UNet (LoRA and taste module attached, no grad)
    eager, then under `torch.compile`: the first compiled call's seconds (compilation) and the
    speed-up; a whole sampling call eager and compiled. Last of the bf16 phases: the trainer's
    UNet is left compiled."""

    def forward():
        return first_step_noise(trainer, traj)

    proof.timed(forward, repeats=2)  # warm-up
    eager_out, eager_s = proof.timed(forward, repeats=5)
    batch = len(traj.latents)
    _, eager_sample_s = proof.timed(lambda: sample_batch(trainer, batch))
    trainer.unet.compile()  # in place: the module is called compiled wherever the trainer calls it
    _, first_s = proof.timed(forward)
    proof.timed(forward, repeats=2)  # shapes settle, recompiles if any
    compiled_out, compiled_s = proof.timed(forward, repeats=5)
    sample_batch(trainer, batch)  # the sampler's own calls (each timestep) compiled
    _, compiled_sample_s = proof.timed(lambda: sample_batch(trainer, batch))
    out = {
        "batch_with_cfg": 2 * batch,
        "eager_call_s": round(eager_s, 4),
        "compile_first_call_s": round(first_s, 2),
        "compiled_call_s": round(compiled_s, 4),
        "speedup": round(eager_s / compiled_s, 3),
        "max_abs_diff_vs_eager": float((compiled_out.float() - eager_out.float()).abs().max()),
        "sampler_images_per_s_eager": round(batch / eager_sample_s, 3),
        "sampler_images_per_s_compiled": round(batch / compiled_sample_s, 3),
    }
    return out


GAP_MODES = {  # name: (train mode, autograd on)
    "no_grad_eval": (False, False),  # as the sampler ran
    "no_grad_train": (True, False),
    "grad_train": (True, True),  # as the update runs (no backward here)
}


def largest_gaps(trainer: Trainer, traj, rows, modes) -> dict[str, float]:
    """Per mode of `GAP_MODES`: the largest |recomputed - stored| log-prob of `rows` over the
    trainable steps of `traj`."""
    steps = trainable_steps(trainer, traj)
    stored = traj.log_probs[rows][:, steps].T
    out = {}
    for mode in modes:
        train, grad = GAP_MODES[mode]
        trainer.unet.train(train)
        recomputed = step_log_probs(trainer, traj, rows, steps, grad=False, enable_grad=grad)
        out[mode] = float((recomputed - stored).abs().max())
    return out


def logprob_gap_sources(proof: Proof, trainer: Trainer) -> dict:
    """Where the first update's log-prob gap comes from: per attention backend (each sampling
    and recomputing under it), 4 images sampled at the update's shape, their trainable steps'
    log-probs recomputed as the update does in three modes: no grad in eval mode (as the
    sampler ran), no grad in train mode, and grad enabled in train mode (the update; no
    backward). Each entry is the largest |recomputed - stored|."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "default": None,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    rows = torch.arange(trainer.cfg.ddpo.train_batch_size, device=proof.device)
    out: dict = {"clip_range": trainer.cfg.ddpo.clip_range}
    for name, backend in backends.items():
        context = contextlib.nullcontext() if backend is None else sdpa_kernel(backend)
        entry: dict = {}
        try:
            with context:
                trainer.unet.eval()
                traj = sample_batch(trainer, len(rows))[3]
                entry.update(largest_gaps(trainer, traj, rows, GAP_MODES))
        except Exception as e:  # a backend this card or shape does not have
            entry["error"] = error_line(e)
        out[name] = entry
    # the update's minibatch mixes rows of different sampling batches: two batches sampled,
    # rows of both recomputed together (default backend)
    trainer.unet.eval()
    n = len(rows)
    a, b = sample_batch(trainer, n)[3], sample_batch(trainer, n)[3]
    half = n // 2
    fields = ("latents", "prompt_embeds", "negative_embeds", "log_probs", "taste")
    mixed = types.SimpleNamespace(
        timesteps=a.timesteps,
        **{
            f: None
            if getattr(a, f) is None
            else torch.cat([getattr(a, f)[:half], getattr(b, f)[: n - half]])
            for f in fields
        },
    )
    out["default_mixed_batches"] = largest_gaps(
        trainer, mixed, rows, ("no_grad_eval", "grad_train")
    )
    trainer.unet.train()
    return out


def dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


# ------------------------------------------------------------------ the proof
def run(args) -> None:
    smoke = args.smoke
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if not smoke and device.type != "cuda":
        raise SystemExit("no CUDA device: run on a GPU, or pass --smoke for the CPU check")
    out = args.out or RESULTS / ("gpu_proof_smoke.json" if smoke else "gpu_proof.json")
    phases = set(args.phases.split(",")) if args.phases else set(PHASES)
    proof = Proof(out, device, phases, args.minibatch_steps, args.epochs)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    proof.results.update(
        {
            "run": args.run,
            "command": "python benchmarks/gpu_proof.py " + shlex.join(args.argv),
            "card": card or "cpu",
            "smoke": smoke,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "clip_model": "toy-clip" if smoke else "ViT-L-14",
            "sd15_size": dataclasses.asdict(SD15_CPU if smoke else SD15_FULL),
            "overrides": args.overrides,
        }
    )
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-proof-"))
    t0 = time.perf_counter()
    base = work / "sd15"
    if not (base / "model_index.json").is_file():
        save_sd15_random(base, SD15_CPU if smoke else SD15_FULL)
    rewards = work / "rm"
    if not (rewards / "config.json").is_file():
        rewards = reward_run(work, random_clip_dir(work / "clip", smoke), str(device))
    proof.results["setup_seconds"] = round(time.perf_counter() - t0, 1)
    batch = 8  # images per sampling call in the throughput phases (DDPO itself samples in 4s)

    trainer = make_trainer(base, rewards, work / "bf16", smoke, *args.overrides)
    bf16_phases(proof, trainer, base, batch)
    del trainer  # GPU memory back for the trainers of other precisions
    release()
    precision_phases(proof, base, rewards, work, smoke, batch)
    proof.results["total_seconds"] = round(time.perf_counter() - t0, 1)
    proof.write()
    print(f"wrote {out}")


def bf16_phases(proof: Proof, trainer: Trainer, base: Path, batch: int) -> None:
    """Every phase at sd15.yaml's settings (bf16), on one trainer."""
    cfg, device = trainer.cfg, proof.device
    proof.results["settings"] = {
        "mixed_precision": cfg.mixed_precision,
        "steps": cfg.sampling.steps,
        "resolution": trainer.latent_size * trainer.pipe.vae_scale_factor,
        "guidance_scale": cfg.sampling.guidance_scale,
        "clip_range": cfg.ddpo.clip_range,
        "train_batch_size": cfg.ddpo.train_batch_size,
        "shuffle": cfg.ddpo.shuffle,
    }

    card = proof.results["card"]
    with proof.phase("dtypes") as r:
        if r is not None:
            lora = next(p for n, p in trainer.unet.named_parameters() if "lora_A" in n)
            r.update(
                {
                    "unet": dtype_name(trainer.unet.conv_in.weight),
                    "vae": dtype_name(trainer.pipe.vae.decoder.conv_in.weight),
                    "text_encoder": dtype_name(next(trainer.pipe.text_encoder.parameters())),
                    "lora": dtype_name(lora),
                    "taste_module": dtype_name(trainer.conditioner.null),
                    "reward_clip": dtype_name(next(trainer.rewards.encoder.model.parameters())),
                    "tf32_matmul": torch.get_float32_matmul_precision(),
                }
            )

    with proof.phase("attention") as r:
        if r is not None:
            _, _, z, traj = sample_batch(trainer, 2)  # small: only the kernels' names matter
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if proof.cuda else [])
            with profile(activities=activities) as prof, torch.no_grad():
                with trainer.precision():
                    unet_forward(
                        trainer.unet,
                        trainer.conditioner,
                        traj.latents[:, 0],
                        traj.timesteps[0],
                        traj.prompt_embeds,
                        z,
                    )
                proof.sync()
            names = {e.key for e in prof.key_averages()}
            r["sdpa_ops"] = sorted(n for n in names if "scaled_dot_product" in n)
            r["kernels"] = sorted(
                n[:80]
                for n in names
                if any(
                    k in n.lower()
                    for k in ("flash", "fmha", "efficient_attention", "cudnn_attention", "xformers")
                )
            )[:10]
            r["processors"] = sorted(
                {type(p).__name__ for p in trainer.unet.attn_processors.values()}
            )

    traj = z = taste = None
    with proof.phase("sampling") as r:
        if r is not None:
            (_, taste, z, traj), seconds = proof.timed(lambda: sample_batch(trainer, batch))
            r.update(
                {
                    "images": batch,
                    "steps": cfg.sampling.steps,
                    "seconds": round(seconds, 3),
                    "images_per_s": round(batch / seconds, 3),
                }
            )
    with proof.phase("decode") as r:
        if r is not None:
            with torch.no_grad(), trainer.precision():
                images, seconds = proof.timed(
                    lambda: decode_images(trainer.pipe.vae, traj.latents[:, -1])
                )
            r.update({"images": batch, "seconds": round(seconds, 4)})
    with proof.phase("reward") as r:
        if r is not None:
            with torch.no_grad():
                reward, seconds = proof.timed(lambda: trainer._reward(traj.images, z, taste))
            r.update(
                {
                    "images": batch,
                    "seconds": round(seconds, 4),
                    "finite": bool(torch.isfinite(reward).all()),
                }
            )

    for checkpointing in (False, True):
        with proof.phase(f"ddpo_minibatch{'_unet_checkpointing' if checkpointing else ''}") as r:
            if r is not None:
                if checkpointing:
                    trainer.unet.enable_gradient_checkpointing()
                trainer.unet.train()
                rows = torch.arange(cfg.ddpo.train_batch_size, device=device)
                all_steps = trainable_steps(trainer, traj)
                # each step's loss is backpropagated on its own, so the peak is one step's and
                # the time is linear in the steps: a few of them measure both
                steps = all_steps[: proof.minibatch_steps]
                step_log_probs(trainer, traj, rows, steps[:1], True)  # kernels' first use
                trainer.optimizer.zero_grad(set_to_none=True)
                _, seconds = proof.timed(
                    lambda rows=rows, steps=steps: step_log_probs(trainer, traj, rows, steps, True)
                )
                trainer.optimizer.zero_grad(set_to_none=True)
                trainer.unet.disable_gradient_checkpointing()
                r.update(
                    {
                        "rows": len(rows),
                        "steps": len(steps),
                        "seconds": round(seconds, 3),
                        "seconds_all_steps": round(seconds * len(all_steps) / len(steps), 2),
                    }
                )

    for checkpointing in ("", "_vae_checkpointing", "_unet_vae_checkpointing"):
        with proof.phase(f"draft_step{checkpointing}") as r:
            if r is not None:
                if "vae" in checkpointing:
                    trainer.pipe.vae.enable_gradient_checkpointing()
                if "unet" in checkpointing:
                    trainer.unet.enable_gradient_checkpointing()
                trainer.unet.train()
                reward, seconds = proof.timed(lambda: draft_step(trainer, cfg.draft.batch_size))
                trainer.pipe.vae.disable_gradient_checkpointing()
                trainer.unet.disable_gradient_checkpointing()
                r.update(
                    {"batch": cfg.draft.batch_size, "seconds": round(seconds, 3), "reward": reward}
                )

    with proof.phase("epochs") as r:
        if r is not None:
            # several epochs: the first of a compiled UNet (compile_unet) pays the compilation
            seconds, gaps, clipped = [], [], []
            for _ in range(proof.epochs):
                log, ddpo_s = proof.timed(trainer.train_epoch)
                seconds.append(round(ddpo_s, 2))
                # 0 when the update recomputes the sampler's batches as sampled (shuffle=batches)
                gaps.append(log.get("logprob_gap"))
                clipped.append(log.get("clipfrac"))
                print(f"ddpo epoch {len(gaps)}: {ddpo_s:.1f} s, logprob_gap {gaps[-1]}", flush=True)
            for key, values in (
                ("ddpo_epoch_s", seconds),
                ("logprob_gap", gaps),
                ("clipfrac", clipped),
            ):  # one epoch: a number, as earlier runs' JSON has it
                r[key] = values[0] if len(values) == 1 else values
            r["ddpo_optimizer_steps"] = log.get("optimizer_steps")
            r["ddpo_images"] = cfg.ddpo.sample_batch_size * cfg.ddpo.sample_batches
            r["clip_range"] = cfg.ddpo.clip_range

    with proof.phase("logprob_gap_sources") as r:
        if r is not None:
            r.update(logprob_gap_sources(proof, trainer))

    with proof.phase("draft_epoch") as r:
        if r is not None:
            trainer.cfg.method = "draft"
            trainer.pipe.vae.enable_gradient_checkpointing()  # as sd15.yaml's DRaFT runs
            _, draft_s = proof.timed(trainer.train_epoch)
            trainer.cfg.method = "ddpo"
            trainer.pipe.vae.disable_gradient_checkpointing()
            r["draft_epoch_s"] = round(draft_s, 2)
            r["draft_images"] = cfg.draft.batch_size * cfg.draft.steps_per_epoch

    with proof.phase("unet_variants") as r:
        if r is not None:
            r.update(unet_variants(proof, trainer, base, traj, batch))

    with proof.phase("sampler_vs_pipeline") as r:
        if r is not None:
            autocast = trainer.cfg.autocast
            for trainer.cfg.autocast in (not autocast, autocast):  # the second is sd15.yaml's
                sample_batch(trainer, batch)  # warm-up
                _, ours = proof.timed(lambda: sample_batch(trainer, batch), repeats=2)
                r[f"trainer_images_per_s_autocast_{trainer.cfg.autocast}"] = round(batch / ours, 3)
            from plural_diffusion.backbone import load_pipeline

            plain = load_pipeline(base, dtype=trainer.pipe.unet.dtype, device=device)
            size = trainer.latent_size * trainer.pipe.vae_scale_factor
            kwargs = dict(
                prompt=[cfg.prompts[0]] * batch,
                num_inference_steps=cfg.sampling.steps,
                guidance_scale=cfg.sampling.guidance_scale,
                eta=cfg.sampling.eta,
                height=size,
                width=size,
                output_type="pt",
                generator=torch.Generator().manual_seed(0),
            )
            with torch.no_grad():
                plain(**kwargs)  # warm-up
                _, theirs = proof.timed(lambda: plain(**kwargs), repeats=2)
                # the same pipeline carrying a LoRA of the trainer's rank and targets: what the
                # trainer's sampler should be compared with
                add_lora(plain.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
                plain.unet.to(device)
                plain(**kwargs)  # warm-up
                _, theirs_lora = proof.timed(lambda: plain(**kwargs), repeats=2)
            del plain
            release()
            r.update(
                {
                    "trainer_images_per_s": round(batch / ours, 3),
                    "pipeline_images_per_s": round(batch / theirs, 3),
                    "trainer_over_pipeline": round(theirs / ours, 3),
                    "pipeline_lora_images_per_s": round(batch / theirs_lora, 3),
                    "trainer_over_pipeline_lora": round(theirs_lora / ours, 3),
                }
            )

    with proof.phase("unet_tflops") as r:
        if r is not None:
            from torch.utils.flop_counter import FlopCounterMode

            x = traj.latents[:, 0]

            def forward():
                return first_step_noise(trainer, traj)

            counter = FlopCounterMode(display=False)
            with counter:
                forward()
            proof.timed(forward, repeats=2)  # warm-up
            _, seconds = proof.timed(forward, repeats=5)
            tflops = counter.get_total_flops() / seconds / 1e12
            peak = bf16_peak(card) if proof.cuda else None
            r.update(
                {
                    "batch_with_cfg": 2 * len(x),
                    "tflop_per_forward": round(counter.get_total_flops() / 1e12, 3),
                    "seconds": round(seconds, 4),
                    "tflops": round(tflops, 2),
                    "bf16_peak_tflops": peak,
                    "share_of_peak": None if peak is None else round(tflops / peak, 3),
                }
            )

    with proof.phase("reward_precision") as r:
        if r is not None:
            with torch.no_grad():
                fp32 = trainer._reward(traj.images, z, taste)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    bf16 = trainer.rewards.reward(
                        traj.images, z, cfg.objective, taste_index=taste % len(trainer.taste_names)
                    )
            r.update(
                {
                    "max_abs_diff_bf16_vs_fp32": float((bf16.float() - fp32).abs().max()),
                    "reward_std_in_batch": float(fp32.std()),
                }
            )

    with proof.phase("cuda_generators") as r:
        if r is not None:  # a CPU generator drawing for CUDA tensors (it used to crash)
            prompt, _, z8, _ = trainer.draw_batch(2)
            embeds, negative = trainer._embeds(prompt)
            small = dataclasses.replace(cfg.sampling, steps=2)
            with torch.no_grad(), trainer.precision():
                t = trainer.policy.sample(
                    prompt_embeds=embeds,
                    negative_embeds=negative,
                    tastes=z8,
                    sampling=small,
                    generator=torch.Generator().manual_seed(0),
                )
            dropped = trainer.conditioner.drop_taste(z8, 0.5, torch.Generator().manual_seed(0))
            r.update(
                {
                    "sample_without_init_latents": str(t.images.device),
                    "drop_taste": str(dropped.device),
                }
            )

    with proof.phase("unet_compile") as r:
        if r is not None:
            r.update(unet_compile(proof, trainer, traj))


def precision_phases(proof: Proof, base: Path, rewards: Path, work: Path, smoke: bool, batch):
    """The first update's log-prob mismatch per precision, and fp16's gradients."""
    device = proof.device
    precisions = ["bf16", "no"] + (["fp16"] if proof.cuda else [])
    with proof.phase("log_prob_by_precision") as r:
        if r is not None:
            for mp in precisions:
                t = make_trainer(base, rewards, work / mp, smoke, f"mixed_precision={mp}")
                rows = torch.arange(t.cfg.ddpo.train_batch_size, device=device)
                # sampled in batches of 8 or of the update's 4, recomputed 4 rows at a time (as
                # the update does); in the UNet's dtype and under autocast
                for autocast in (False, True) if mp != "no" else (False,):
                    for sampled in (batch, len(rows)):
                        t.cfg.autocast = autocast
                        tr = sample_batch(t, sampled)[3]
                        steps = trainable_steps(t, tr)
                        t.unet.train()
                        recomputed = step_log_probs(t, tr, rows, steps, grad=False)  # [S, B]
                        stored = tr.log_probs[rows][:, steps].T
                        diff = (recomputed - stored).abs()
                        clip = t.cfg.ddpo.clip_range
                        outside = ((diff.exp() - 1).abs() > clip).float().mean()
                        key = f"{mp}{'_autocast' if autocast else ''}_sampled_{sampled}"
                        r[key] = {
                            "max_abs_diff": float(diff.max()),
                            "mean_abs_diff": float(diff.mean()),
                            "clip_range": clip,
                            "share_outside_clip": float(outside),
                        }
                        del tr
                del t
                release()

    with proof.phase("fp16_gradients") as r:
        if r is not None:
            if not proof.cuda:
                r["skipped"] = "fp16 needs CUDA"
            else:
                t = make_trainer(
                    base,
                    rewards,
                    work / "fp16-train",
                    smoke,
                    "mixed_precision=fp16",
                    "ddpo.sample_batches=1",
                    "ddpo.sample_batch_size=4",
                    "ddpo.gradient_accumulation=1",
                )
                log = t.train_epoch()
                norm = torch.cat([p.grad.flatten() for p in t.params if p.grad is not None]).norm()
                r.update(
                    {
                        "loss": log["loss"],
                        "skipped_steps": log.get("skipped_steps"),
                        "grad_norm_finite": bool(torch.isfinite(norm)),
                        "loss_scale": t.accelerator.scaler.get_scale(),
                    }
                )
                del t
                release()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="the JSON to write")
    parser.add_argument("--work", default=None, help="work directory (reused when it exists)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="key=value on sd15.yaml for the bf16 trainer (repeatable)",
    )
    parser.add_argument("--run", default=None, help="a line on this run (code, machine), kept")
    parser.add_argument("--phases", default=None, help=f"comma-separated subset of {PHASES}")
    parser.add_argument(
        "--minibatch-steps",
        type=int,
        default=10,
        help="denoising steps timed per DDPO minibatch (the rest are extrapolated)",
    )
    parser.add_argument(
        "--epochs", type=int, default=1, help="DDPO epochs the epochs phase trains and times"
    )
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.smoke:
        torch.set_num_threads(1)
    run(args)


if __name__ == "__main__":
    main()
