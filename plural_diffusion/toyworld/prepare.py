"""`plural-diffusion toy prepare`: the toy world's data and tiny models, built once and cached.

Three stages, each cached under its own config hash (see `plural_diffusion.cache`): the rated toy
world (images + tables), the tiny open_clip model, and the tiny Stable Diffusion pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from plural_diffusion.cache import cached_stage, code_fingerprint
from plural_diffusion.toyworld.base import ToyBaseConfig, train_toy_base
from plural_diffusion.toyworld.clip import ToyClipConfig, train_toy_clip
from plural_diffusion.toyworld.ratings import ToyWorldConfig, write_world
from reward_models.config import to_dict


@dataclass
class ToyPrepareConfig:
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    clip: ToyClipConfig = field(default_factory=ToyClipConfig)
    base: ToyBaseConfig = field(default_factory=ToyBaseConfig)


@dataclass
class ToyAssets:
    """Where the prepared toy world lives: rating tables, CLIP model dir, diffusers pipeline dir."""

    world: Path | None
    clip: Path | None
    base: Path | None
    seconds: dict[str, float]


STAGES = ("world", "clip", "base")
_WORLD = (
    "plural_diffusion.toyworld.images",
    "plural_diffusion.toyworld.raters",
    "plural_diffusion.toyworld.ratings",
)
# the modules each stage runs: an edit to them rebuilds the stage (see cache.code_fingerprint)
STAGE_CODE = {
    "toy-world": _WORLD,
    "toy-clip": (*_WORLD, "plural_diffusion.toyworld.clip"),
    "toy-base": (
        *_WORLD,
        "plural_diffusion.toyworld.base",
        "plural_diffusion.toyworld.vae",
        "plural_diffusion.toyworld.tokenizer",
    ),
}


def prepare_toy(
    cfg: ToyPrepareConfig,
    root: Path | None = None,
    progress: bool = True,
    rebuild: bool = False,
    stages: tuple[str, ...] = STAGES,
) -> ToyAssets:
    """Build (or reuse from the cache) the toy stages; returns their directories (None for a
    stage not asked for)."""
    seconds = {}

    def stage(name, stage_cfg, build):
        t0 = time.perf_counter()
        key = {**to_dict(stage_cfg), "code": code_fingerprint(*STAGE_CODE[name])}
        path = cached_stage(name, key, build, root=root, rebuild=rebuild)
        seconds[name] = round(time.perf_counter() - t0, 2)
        return path

    world = clip = base = None
    if "world" in stages:
        world = stage(
            "toy-world", cfg.world, lambda d: write_world(cfg.world, d, progress=progress)
        )
    if "clip" in stages:
        clip = stage("toy-clip", cfg.clip, lambda d: train_toy_clip(cfg.clip, d, progress=progress))
    if "base" in stages:
        base = stage("toy-base", cfg.base, lambda d: train_toy_base(cfg.base, d, progress=progress))
    return ToyAssets(world=world, clip=clip, base=base, seconds=seconds)
