"""`plural-diffusion generate`: images per taste from a base model and an optional trained policy.

A taste is a vector z in the reward run's taste space, named on the command line as

    cluster:NAME_OR_INDEX   a taste cluster's centroid            (cluster:noir, cluster:0)
    rater:ID                a known rater's learned taste          (rater:rater_007)
    ratings:FILE            a new user's taste, fitted to a few of their ratings without
                            retraining (`reward_models.personalize`; also `--ratings FILE`)
    nearest:FILE            the taste cluster those ratings most probably put the user in
                            (`plural_diffusion.new_user`): a taste the policy was trained on,
                            which serves a small cluster's users better than the fitted taste
                            (benchmarks/new_users_toy.py)
    mean                    the null taste: "no preference"

`--lottery FILE` (a `lottery.json` from `plural-diffusion demo`, or `lottery-NAME.json` from
`evaluate --lottery`) makes a taste-matched policy taste-blind: each (prompt, seed) image is made
for a cluster drawn with the egalitarian shares (`plural_diffusion.lottery`), the same draw the
evaluation makes; the manifest and each PNG say which cluster.

Every image is fixed by (taste, prompt, seed) alone: its initial noise and the noise of every
DDIM step come from its own generator seeded with `seed`. The same seed under two tastes, or two
policies, therefore differs only by what the taste (or the policy) changed, and an image does not
depend on which other images shared its batch (beyond float rounding: CPU kernels may sum in
another order for another batch size).

Images are sampled as the policy was trained (DDIM steps, guidance scale, eta and negative
prompt from the checkpoint) unless a value is overridden; each PNG and the manifest say which
values were used and where each came from.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from plural_diffusion.policy import CheckpointInfo, SamplerSettings, SamplingOverrides, TastePolicy
from plural_diffusion.visualize import save_grid
from reward_models.errors import UserError
from reward_models.io import atomic_path, write_json

TASTE_FORMS = "cluster:NAME_OR_INDEX, rater:ID, ratings:FILE, nearest:FILE or mean"
NULL_SPECS = ("mean", "null", "none")


@dataclass
class Taste:
    """One taste to generate for: a label for people, the spec it came from, and z."""

    label: str  # "noir", "rater rater_007", "user my_ratings.csv", "mean"
    spec: str  # as given: "cluster:noir"
    z: torch.Tensor | None  # [d]; None = the null taste (no preference)


# --------------------------------------------------------------------------------- tastes
def resolve_taste(spec: str, rewards=None) -> Taste:
    """A taste from its spec (see the module docstring); `rewards` is a `TasteRewards`."""
    spec = spec.strip()
    kind, _, value = spec.partition(":")
    if spec in NULL_SPECS:
        return Taste("mean", spec, None)
    if kind not in ("cluster", "rater", "ratings", "nearest") or not value:
        raise UserError(f"taste {spec!r}: use {TASTE_FORMS}")
    if rewards is None:
        raise UserError(
            f"taste {spec!r} needs the reward run: pass --rewards RUN_DIR (the one the policy "
            "was trained with)"
        )
    if kind == "cluster":
        names = rewards.cluster_names
        if value in names:
            k = names.index(value)
        elif value.isdigit() and int(value) < len(names):
            k = int(value)
        else:
            raise UserError(
                f"unknown cluster {value!r}; known: {', '.join(names)} "
                f"(or an index 0..{len(names) - 1})"
            )
        return Taste(names[k], spec, rewards.cluster_tastes[k].detach().cpu())
    if kind == "rater":
        ids = rewards.rater_ids
        if value not in ids:
            close = [r for r in ids if value in r][:3] or ids[:3]
            raise UserError(
                f"unknown rater {value!r}; e.g. {', '.join(close)} ({len(ids)} raters, listed in "
                "the reward run's raters.json)"
            )
        return Taste(f"rater {value}", spec, rewards.rater_tastes[ids.index(value)].detach().cpu())
    if kind == "nearest":
        return nearest_cluster_of_ratings(value, rewards, spec)
    return taste_from_ratings_file(value, rewards, spec)


def nearest_cluster_of_ratings(path: str | Path, rewards, spec: str) -> Taste:
    """The taste of the cluster a new user's ratings file most probably puts them in (the
    share of their taste posterior nearest each cluster's taste; `plural_diffusion.new_user`)."""
    from plural_diffusion.new_user import infer_taste
    from reward_models.personalize import read_user_ratings

    images, scores = read_user_ratings(path)
    features = rewards.encoder.encode_images(images, progress=False)
    taste = infer_taste(rewards, features.to(rewards.device), scores)
    name, probability = taste.nearest_clusters(rewards.cluster_names)[0]
    z = rewards.cluster_tastes[rewards.cluster_names.index(name)].detach().cpu()
    return Taste(f"user {Path(path).name} -> {name} ({probability:.0%})", spec, z)


def taste_from_ratings_file(path: str | Path, rewards, spec: str | None = None) -> Taste:
    """A new user's taste, MAP-fitted to their ratings file under the frozen rater head."""
    from reward_models.personalize import taste_from_ratings

    if rewards is None:
        raise UserError("--ratings needs the reward run: pass --rewards RUN_DIR")
    if rewards.space == "latent":  # the policy reads latent tastes: the encoder's posterior mean
        from reward_models.personalize import latent_taste_from_ratings

        z = latent_taste_from_ratings(rewards.run, path, rewards.encoder).mean[0]
    else:
        z = taste_from_ratings(rewards.run, path, encoder=rewards.encoder).z
    return Taste(f"user {Path(path).name}", spec or f"ratings:{path}", z.detach().cpu())


def interpolate(a: Taste, b: Taste, steps: int, null: torch.Tensor | None) -> list[Taste]:
    """`steps` tastes on the line from a to b (both included); `null` [d] stands in for the
    null taste (the conditioner's learned vector)."""
    if steps < 2:
        raise UserError(f"--interpolate-steps {steps}: need at least 2 (the two ends)")
    ends = [a.z, b.z]
    if any(z is None for z in ends):
        if null is None:
            raise UserError("interpolating to 'mean' needs a taste-conditioned checkpoint")
        ends = [null if z is None else z for z in ends]
    out = []
    for i in range(steps):
        t = i / (steps - 1)
        label = (
            a.label
            if i == 0
            else b.label
            if i == steps - 1
            else f"{1 - t:.2f} {a.label} + {t:.2f} {b.label}"
        )
        out.append(Taste(label, f"{a.spec}..{b.spec}@{t:.3f}", (1 - t) * ends[0] + t * ends[1]))
    return out


def check_tastes(policy: TastePolicy | CheckpointInfo | None, tastes: list[Taste]) -> None:
    """A taste needs a taste-conditioned policy whose z has the tastes' dimension (None: the
    base model; a `CheckpointInfo` is checked before the pipeline is loaded)."""
    wanted = [t for t in tastes if t.z is not None]
    if not wanted:
        return
    if isinstance(policy, CheckpointInfo):
        conditioned, checkpoint = policy.conditioned, policy.path
    else:
        conditioned = policy is not None and policy.conditioner is not None
        checkpoint = None if policy is None else policy.checkpoint
    if not conditioned:
        what = "the base model" if checkpoint is None else f"checkpoint {checkpoint}"
        raise UserError(
            f"{what} has no taste conditioner (a taste-blind policy), so it cannot generate for "
            f"taste {wanted[0].spec!r}; use --taste mean or a checkpoint trained with "
            "objective=matched"
        )
    if isinstance(policy, CheckpointInfo):
        return
    d = policy.conditioner.config.taste_dim
    if wanted[0].z.shape != (d,):
        raise UserError(
            f"taste {wanted[0].spec!r} has {wanted[0].z.numel()} dims but the checkpoint's "
            f"conditioner reads {d}; use the reward run the policy was trained with"
        )


# --------------------------------------------------------------------------------- sampling
@torch.no_grad()
def generate_images(
    policy: TastePolicy,
    prompts: list[str],
    tastes: list[Taste],
    seeds: list[int],
    settings: SamplerSettings,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """Images [T, P, S, 3, H, W] in [0, 1] for every (taste, prompt, seed), sampled with
    `settings` (see `TastePolicy.settings`)."""
    if not prompts or not tastes or not seeds:
        raise UserError("need at least one prompt, one taste and one seed")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size}: must be >= 1")
    check_tastes(policy, tastes)
    rows = [
        (t, p, s)
        for p in range(len(prompts))
        for t in range(len(tastes))
        for s in range(len(seeds))
    ]
    out: list[torch.Tensor | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), unit="img", desc="generating", disable=not progress, leave=False)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        traj = policy.sample(
            prompts=[prompts[p] for _, p, _ in chunk],
            tastes=policy.taste_batch([tastes[t].z for t, _, _ in chunk]),
            # one generator per image: its initial noise, then its DDIM step noise
            generator=[torch.Generator().manual_seed(int(seeds[s])) for _, _, s in chunk],
            sampling=settings.sampling,
            negative_prompt=settings.negative_prompt,
        )
        for i, row in enumerate(range(start, start + len(chunk))):
            out[row] = traj.images[i].cpu()
        bar.update(len(chunk))
    bar.close()
    images = torch.stack(out)  # [P * T * S, 3, H, W], prompt-major
    images = images.view(len(prompts), len(tastes), len(seeds), *images.shape[1:])
    return images.transpose(0, 1).contiguous()  # [T, P, S, 3, H, W]


# --------------------------------------------------------------------------------- files
def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe version of `text`: 'an image of one circle' -> 'an-image-of-one-circle'."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:limit].rstrip("-") or "x"


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> an RGB PIL image."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def save_png(image: torch.Tensor, path: Path, text: dict[str, str]) -> None:
    """Write one image as PNG, atomically, with `text` as PNG tEXt/iTXt metadata."""
    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, str(value))
    with atomic_path(path) as tmp:
        to_pil(image).save(tmp, format="PNG", pnginfo=info)


def write_outputs(
    images: torch.Tensor,
    policy: TastePolicy,
    prompts: list[str],
    tastes: list[Taste],
    seeds: list[int],
    settings: SamplerSettings,
    out_dir: str | Path,
    made_for: list[list[str]] | None = None,
) -> dict:
    """One PNG per (taste, prompt, seed), a labelled grid per prompt (rows tastes, columns
    seeds) and manifest.json listing them; returns the manifest. The sampler settings, and
    whether each came from the checkpoint or the user, go into both. made_for [P][S]: a
    lottery's cluster for each image (one taste, the lottery)."""
    out_dir = Path(out_dir)
    checkpoint = "none (base model)" if policy.checkpoint is None else str(policy.checkpoint)
    sampler = settings.describe()
    manifest = {
        "base": policy.base,
        "checkpoint": checkpoint,
        "sampling": sampler,
        "dtype": str(policy.pipe.unet.dtype).removeprefix("torch."),
        "tastes": [
            {"label": t.label, "spec": t.spec, "z": None if t.z is None else t.z.tolist()}
            for t in tastes
        ],
        "prompts": [],
    }
    for p, prompt in enumerate(prompts):
        folder = out_dir / f"p{p}-{slug(prompt)}"
        files = []
        for t, taste in enumerate(tastes):
            z = None if taste.z is None else [round(v, 6) for v in taste.z.tolist()]
            for s, seed in enumerate(seeds):
                path = folder / f"t{t}-{slug(taste.label)}-seed{seed}.png"
                text = {
                    "prompt": prompt,
                    "taste": taste.label,
                    "taste_spec": taste.spec,
                    "taste_vector": json.dumps(z),
                    "seed": seed,
                    "checkpoint": checkpoint,
                    "base": policy.base,
                    "steps": sampler["steps"],
                    "guidance": sampler["guidance"],
                    "eta": sampler["eta"],
                    "stochastic_steps": sampler["stochastic_steps"],
                    "negative_prompt": sampler["negative_prompt"],
                    "sampling_source": json.dumps(sampler["source"]),
                    "software": "plural-diffusion generate",
                }
                entry = {"taste": taste.label, "seed": seed, "file": str(path.relative_to(out_dir))}
                if made_for is not None:
                    text["made_for"] = entry["made_for"] = made_for[p][s]
                save_png(images[t, p, s], path, text)
                files.append(entry)
        grid = out_dir / f"grid-p{p}-{slug(prompt)}.png"
        save_grid(
            images[:, p],
            grid,
            row_labels=[t.label for t in tastes],
            col_labels=[f"seed {s}" for s in seeds],
            title=f"'{prompt}'",
            cell_inches=0.9 if images.shape[-1] <= 64 else 1.6,
        )
        manifest["prompts"].append({"prompt": prompt, "grid": grid.name, "images": files})
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def parse_seeds(n: int | None, seed_list: str | None) -> list[int]:
    """Seeds from `--seeds N` (0..N-1) or `--seed-list 3,7,11`."""
    if seed_list is not None:
        try:
            seeds = [int(s) for s in seed_list.replace(" ", "").split(",") if s]
        except ValueError:
            raise UserError(f"--seed-list {seed_list!r}: expected integers like 3,7,11") from None
        if not seeds or any(s < 0 for s in seeds):
            raise UserError(f"--seed-list {seed_list!r}: expected non-negative integers")
        return seeds
    n = 4 if n is None else n
    if n < 1:
        raise UserError(f"--seeds {n}: need at least 1")
    return list(range(n))


def run_generate(
    base: str | None,
    checkpoint: str | Path | None,
    rewards_dir: str | Path | None,
    taste_specs: list[str],
    ratings: list[str],
    interpolate_pair: list[str] | None,
    interpolate_steps: int,
    prompts: list[str],
    seeds: list[int],
    overrides: SamplingOverrides | None,
    out_dir: str | Path,
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
    dtype: str = "fp32",
    lottery: str | Path | None = None,
    compile_unet: bool = False,
) -> dict:
    """What `plural-diffusion generate` does. Base, rewards, prompts and the sampler (steps,
    guidance, eta, negative prompt) default to the ones the checkpoint was trained with;
    `overrides` replaces any of the sampler's values."""
    from plural_diffusion.rewards import TasteRewards

    info = CheckpointInfo.read(checkpoint) if checkpoint is not None else None
    trained = info.config if info is not None else {}
    base = base or trained.get("base")
    if not base:
        raise UserError("no base model: pass --base DIR_OR_HUB_ID")
    prompts = prompts or trained.get("prompts", [])[:2]
    if not prompts:
        raise UserError('no prompts: pass --prompt "..." (repeatable)')
    conditioned = info is not None and info.conditioned
    overrides = (overrides or SamplingOverrides()).check()  # fail before the slow loading

    specs = list(taste_specs) + [f"ratings:{r}" for r in ratings]
    if lottery is not None:
        if specs or interpolate_pair:
            raise UserError(
                "--lottery draws each image's cluster itself; drop --taste, "
                "--ratings and --interpolate"
            )
        if not conditioned:
            raise UserError(
                "--lottery draws from a taste-matched policy: pass --checkpoint of "
                "one trained with objective=matched"
            )
        if not Path(lottery).is_file():
            raise UserError(f"{lottery}: lottery file not found")
    # no taste named: every cluster for a taste-conditioned policy, the null taste otherwise
    every_cluster = not specs and not interpolate_pair and conditioned
    if not specs and not interpolate_pair and not conditioned:
        specs = ["mean"]
    named = specs + list(interpolate_pair or [])
    rewards = None
    if every_cluster or any(s.strip() not in NULL_SPECS for s in named):
        rewards_dir = rewards_dir or trained.get("rewards")
        if not rewards_dir:
            raise UserError("tastes other than 'mean' need the reward run: pass --rewards RUN_DIR")
        if not Path(rewards_dir).exists():
            raise UserError(f"{rewards_dir}: reward run not found; pass --rewards RUN_DIR")
        space = info.taste_space if info is not None else "rater"
        rewards = TasteRewards(str(rewards_dir), device=device, space=space)
    if every_cluster:
        specs = [f"cluster:{name}" for name in rewards.cluster_names]
    # resolve (and reject unknown ids) before the slow part: loading the pipeline
    tastes = [resolve_taste(s, rewards) for s in specs]
    ends = [resolve_taste(s, rewards) for s in interpolate_pair or []]
    if not conditioned:
        check_tastes(info, tastes + ends)  # a taste-blind policy takes only 'mean'

    policy = TastePolicy.from_pretrained(
        base,
        None if info is None else info.path,
        device=device,
        dtype=dtype,
        compile_unet=compile_unet,
    )
    if ends:
        null = None if policy.conditioner is None else policy.conditioner.null.detach().cpu()
        tastes += interpolate(ends[0], ends[1], interpolate_steps, null)

    settings = policy.settings(overrides)
    if lottery is not None:
        return _generate_lottery(
            policy,
            rewards,
            lottery,
            tastes,
            prompts,
            seeds,
            settings,
            batch_size,
            progress,
            out_dir,
        )
    images = generate_images(policy, prompts, tastes, seeds, settings, batch_size, progress)
    return write_outputs(images, policy, prompts, tastes, seeds, settings, out_dir)


def _generate_lottery(
    policy, rewards, path, tastes, prompts, seeds, settings, batch_size, progress, out_dir
) -> dict:
    """Each (prompt, seed) image made for the cluster the lottery draws for it (`tastes`: one
    per cluster, in the reward run's order), written as one taste, the lottery."""
    from plural_diffusion.lottery import lottery_draw, read_lottery

    shares = read_lottery(path, rewards.cluster_names)
    drawn = lottery_draw(len(prompts), len(seeds), shares)  # [P, S]
    images: list[list[torch.Tensor | None]] = [[None] * len(seeds) for _ in prompts]
    for p, prompt in enumerate(prompts):
        for k, taste in enumerate(tastes):
            rows = (drawn[p] == k).nonzero()[:, 0].tolist()
            if not rows:
                continue
            made = generate_images(
                policy, [prompt], [taste], [seeds[s] for s in rows], settings, batch_size, progress
            )
            for i, s in enumerate(rows):
                images[p][s] = made[0, 0, i]
    stacked = torch.stack([torch.stack(row) for row in images])[None]  # [1, P, S, 3, H, W]
    made_for = [[rewards.cluster_names[k] for k in row] for row in drawn.tolist()]
    shown = Taste("lottery", f"lottery:{path}", None)
    return write_outputs(stacked, policy, prompts, [shown], seeds, settings, out_dir, made_for)
