"""The diffusion backbone: load a Stable Diffusion pipeline, add LoRA, save and load checkpoints.

One code path for every base model: the toy base directory and SD 1.x / 2.x (local path or hub
id) all load through `StableDiffusionPipeline.from_pretrained`. LoRA goes in through peft the way
diffusers' training scripts do it (`unet.add_adapter`), and checkpoints hold the LoRA in the file
format `StableDiffusionPipeline.load_lora_weights` reads, so a trained policy loads into plain
diffusers with no code from this project. Checkpoint directory layout:

    checkpoint.json                      LoRA rank / alpha / targets, caller metadata
    pytorch_lora_weights.safetensors     diffusers LoRA format (+ peft config in its metadata)
    taste_conditioner/                   optional, see `plural_diffusion.conditioning`
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from plural_diffusion.conditioning import (
    TasteConditioner,
    load_taste_conditioner,
    save_taste_conditioner,
)
from plural_diffusion.unwrap import unwrap
from reward_models.errors import UserError
from reward_models.io import atomic_dir, load_tensors, read_json, write_json

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name
CHECKPOINT_JSON = "checkpoint.json"
TASTE_DIR = "taste_conditioner"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "default"  # peft's adapter name; one trainable adapter per UNet

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch dtype from a config string ("fp32", "bf16", "fp16") or a dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of fp32, bf16, fp16")
    return _DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else is meant as a directory.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def load_pipeline(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    xformers: bool = False,
    keep_safety_checker: bool = False,
) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` with a `DDIMScheduler`, weights in `dtype`, on `device`.

    An existing local directory is read with `local_files_only=True` (never the network); a
    string that is not a directory is treated as a hub id. Attention is PyTorch SDPA (diffusers'
    default); `xformers=True` switches to xformers when it is installed and the device is CUDA,
    and otherwise warns and keeps SDPA. The safety checker is dropped unless asked for: training
    scores raw images, and it would cost memory on every step.
    """
    name = str(path_or_hub_id)
    local = Path(name).expanduser()
    is_local = local.exists()
    if not is_local and _looks_like_path(name):
        raise UserError(
            f"{name}: base model directory not found; build the toy base or fix the path"
        )
    if is_local:
        index = local / "model_index.json"
        if not index.is_file():
            raise UserError(
                f"{local}: no model_index.json; point at a diffusers pipeline directory"
            )
        pipeline_class = read_json(index).get("_class_name")
        if pipeline_class != "StableDiffusionPipeline":
            raise UserError(
                f"{local}: a {pipeline_class}, not a StableDiffusionPipeline (SD 1.x / 2.x); "
                "this base model is not supported"
            )
    extra = (
        {} if keep_safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    )
    dtype = resolve_dtype(dtype)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(local) if is_local else name, dtype=dtype, local_files_only=is_local, **extra
        )
    except OSError as e:
        where = "local directory" if is_local else "hub id"
        raise UserError(f"{name}: could not load the {where} ({str(e).splitlines()[0]})") from None
    # DDPO's policy is the DDIM step with eta > 0 (plural_diffusion.ddim); same betas and timesteps.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if xformers:
        if torch.device(device).type == "cuda" and importlib.util.find_spec("xformers") is not None:
            pipe.enable_xformers_memory_efficient_attention()
        else:
            warnings.warn(
                "xformers requested but not installed or not on CUDA; using SDPA", stacklevel=2
            )
    return pipe


SD15_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD15_UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def architecture_mismatch(pipe: StableDiffusionPipeline, expected: str) -> str | None:
    """What makes `pipe` not an `expected` ("sd15": Stable Diffusion 1.x) model, or None.

    Checks the layout, not the sizes a test may scale down: SD 1.x's block types, block widths
    in the ratio 1:2:4:4 (320/640/1280/1280), 768-wide text states (SD 2.x: 1024), 4 latent
    channels and 8x VAE downsampling.
    """
    assert expected == "sd15", expected
    unet, vae = pipe.unet.config, pipe.vae.config
    widths = tuple(unet.block_out_channels)
    text_width = pipe.text_encoder.config.hidden_size
    if unet.cross_attention_dim != 768 or text_width != 768:
        return f"text states are {unet.cross_attention_dim} wide (SD 1.x: 768; SD 2.x: 1024)"
    if tuple(unet.down_block_types) != SD15_DOWN_BLOCKS or tuple(unet.up_block_types) != (
        SD15_UP_BLOCKS
    ):
        return f"UNet blocks are {list(unet.down_block_types)} (SD 1.x: {list(SD15_DOWN_BLOCKS)})"
    if len(widths) != 4 or [w / widths[0] for w in widths] != [1, 2, 4, 4]:
        return f"UNet block widths are {list(widths)} (SD 1.x: 320, 640, 1280, 1280)"
    if unet.in_channels != 4 or vae.latent_channels != 4:
        return f"latents have {vae.latent_channels} channels (SD 1.x: 4)"
    if len(vae.block_out_channels) != 4:
        return f"the VAE downsamples {2 ** (len(vae.block_out_channels) - 1)}x (SD 1.x: 8x)"
    return None


def add_lora(
    unet: UNet2DConditionModel,
    rank: int = 4,
    alpha: float = 4.0,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
) -> UNet2DConditionModel:
    """Freeze `unet` and add a trainable LoRA adapter (B zero-initialised: output unchanged).

    LoRA weights are kept in float32 even when the UNet is bf16/fp16 (peft casts activations),
    as diffusers' training scripts do. The LoRA update is scaled by alpha / rank.
    """
    if rank < 1 or alpha <= 0:
        raise UserError(f"LoRA rank={rank}, alpha={alpha}: rank must be >= 1 and alpha > 0")
    if getattr(unet, "peft_config", None) and ADAPTER in unet.peft_config:
        raise UserError("this UNet already has a LoRA adapter; load a fresh base model")
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules)
    )
    unet.add_adapter(config, adapter_name=ADAPTER)
    cast_training_params(unet, dtype=torch.float32)
    return unet


def trainable_parameters(
    unet: UNet2DConditionModel, conditioner: TasteConditioner | None = None
) -> list[torch.nn.Parameter]:
    """What the optimizer updates: the LoRA weights and, if given, the taste conditioner."""
    params = [p for p in unet.parameters() if p.requires_grad]
    if conditioner is not None:
        params += [p for p in conditioner.parameters() if p.requires_grad]
    return params


@contextlib.contextmanager
def disable_adapters(unet: UNet2DConditionModel) -> Iterator[UNet2DConditionModel]:
    """Run the base UNet (LoRA off) inside the block, e.g. for a KL-to-base penalty.

    `unet` may be wrapped (DDP, torch.compile); the wrapper is yielded.
    """
    inner = unwrap(unet)
    inner.disable_adapters()
    try:
        yield unet
    finally:
        inner.enable_adapters()


def _lora_config(unet: UNet2DConditionModel) -> LoraConfig:
    if not getattr(unet, "peft_config", None) or ADAPTER not in unet.peft_config:
        raise UserError("the UNet has no LoRA adapter to save; call add_lora first")
    return unet.peft_config[ADAPTER]


def save_checkpoint(
    directory: str | os.PathLike,
    unet: UNet2DConditionModel,
    conditioner: TasteConditioner | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write the LoRA (diffusers format) and the taste conditioner into `directory`, atomically.

    `metadata` (JSON-able: step, config, ...) is stored in checkpoint.json for the caller.
    """
    config = _lora_config(unet)
    directory = Path(directory)
    lora_layers = convert_state_dict_to_diffusers(
        get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    )
    with atomic_dir(directory) as tmp:
        # The peft config in the file's metadata lets load_lora_weights restore alpha != rank;
        # without it diffusers assumes alpha = rank and a resumed LoRA is silently rescaled.
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=lora_layers,
            unet_lora_adapter_metadata=config.to_dict(),
            weight_name=LORA_WEIGHTS_NAME,
            safe_serialization=True,
        )
        if conditioner is not None:
            save_taste_conditioner(conditioner, tmp / TASTE_DIR)
        lora = {
            "rank": config.r,
            "alpha": config.lora_alpha,
            "target_modules": sorted(config.target_modules),
        }
        write_json(tmp / CHECKPOINT_JSON, {"lora": lora, "metadata": metadata or {}})
    return directory


def _unet_lora_state(path: Path) -> dict[str, torch.Tensor]:
    """The UNet part of a diffusers LoRA file, with peft's key names (`...to_q.lora_A.weight`)."""
    state = load_tensors(path)
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not unet_state:
        raise UserError(f"{path}: no UNet LoRA weights (keys 'unet.*'); not a LoRA checkpoint")
    return convert_unet_state_dict_to_peft(unet_state)


def lora_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """A copy of the UNet's LoRA weights, with peft's key names."""
    state = get_peft_model_state_dict(unwrap(unet), adapter_name=ADAPTER)
    return {k: v.detach().clone() for k, v in state.items()}


def read_lora_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's LoRA weights (its `policy/` directory), with peft's key names."""
    return _unet_lora_state(Path(directory) / LORA_WEIGHTS_NAME)


def set_lora_state(unet: UNet2DConditionModel, state: dict[str, torch.Tensor]) -> None:
    """Write LoRA weights with peft's key names (`lora_state`) into the UNet's adapter."""
    result = set_peft_model_state_dict(unwrap(unet), state, adapter_name=ADAPTER)
    assert not getattr(result, "unexpected_keys", None), result


def load_checkpoint(
    directory: str | os.PathLike, unet: UNet2DConditionModel
) -> tuple[UNet2DConditionModel, TasteConditioner | None]:
    """Load a checkpoint's LoRA into `unet` (trainable, to resume) and return its conditioner.

    A UNet without LoRA gets one with the checkpoint's rank/alpha/targets. Every tensor must match
    the UNet's LoRA by name and shape: a LoRA for another base model or another rank is a
    UserError, never a partial load that leaves layers at the base weights. The conditioner (or
    None) is returned unattached; call `conditioner.attach(unet)`.
    """
    directory = Path(directory)
    info = read_json(directory / CHECKPOINT_JSON)
    try:
        rank, alpha, targets = (info["lora"][k] for k in ("rank", "alpha", "target_modules"))
    except (KeyError, TypeError):
        raise UserError(
            f"{directory / CHECKPOINT_JSON}: no 'lora' rank/alpha/target_modules"
        ) from None
    if not getattr(unet, "peft_config", None) or ADAPTER not in unet.peft_config:
        add_lora(unet, rank=rank, alpha=alpha, target_modules=targets)
    elif unet.peft_config[ADAPTER].lora_alpha / unet.peft_config[ADAPTER].r != alpha / rank:
        raise UserError(
            f"{directory}: LoRA alpha/rank {alpha}/{rank} differs from the UNet's adapter "
            f"({unet.peft_config[ADAPTER].lora_alpha}/{unet.peft_config[ADAPTER].r}); "
            "load into a fresh base model"
        )

    path = directory / LORA_WEIGHTS_NAME
    state = _unet_lora_state(path)
    expected = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    if missing := sorted(set(expected) - set(state)):
        raise UserError(
            f"{path}: no weights for '{missing[0]}' ({len(missing)} missing); "
            "the LoRA was trained on another base model or other target modules"
        )
    if unexpected := sorted(set(state) - set(expected)):
        raise UserError(
            f"{path}: '{unexpected[0]}' matches no LoRA layer of this UNet; another base model?"
        )
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise UserError(
                f"{path}: '{key}' has shape {tuple(state[key].shape)}, the UNet's LoRA needs "
                f"{tuple(value.shape)}; another rank or another base model"
            )
    set_lora_state(unet, state)
    taste_dir = directory / TASTE_DIR
    conditioner = load_taste_conditioner(taste_dir) if taste_dir.is_dir() else None
    return unet, conditioner
