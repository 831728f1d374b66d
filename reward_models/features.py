"""open_clip image features with a resumable, content-addressed safetensors cache.

`load_clip` turns a user's model spec into a `ClipEncoder` without touching the network unless
the spec itself names remote weights (a pretrained tag or an `hf-hub:` id). `FeatureCache` stores
features as shards keyed by (encoder identity, image content hash); each shard carries its own
keys and checksum, so the index is rebuilt from the shards and a damaged shard is recomputed.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torchvision.transforms.functional as TF
from open_clip.factory import _find_checkpoint_in_dir
from open_clip.transform import center_crop_or_pad
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from torchvision.transforms import InterpolationMode
from tqdm.auto import tqdm

from reward_models.errors import UserError
from reward_models.image_files import IMAGE_SUFFIXES, has_image_suffix
from reward_models.io import file_sha256, save_tensors

ImageInput = str | os.PathLike | Image.Image | torch.Tensor
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_LIST_MODELS = "python -c 'import open_clip; print(open_clip.list_models())'"


class ClipEncoder:
    """An open_clip image tower that maps images to L2-normalised feature vectors.

    `name` identifies model + weights (+ precision) and is the cache key namespace: two encoders
    with the same name must produce the same features.
    """

    def __init__(
        self, model: torch.nn.Module, preprocess, name: str, device="cpu", precision="fp32"
    ):
        self.model = model.eval()
        self.preprocess = preprocess  # open_clip's eval transform: PIL image -> [3, S, S]
        self.preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
        self.name = name
        self.device = torch.device(device)
        self.dtype = _DTYPES[precision]
        size = self.preprocess_cfg["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        # Probe once rather than guess the output width from tower-specific attributes.
        with torch.no_grad():
            probe = self.model.encode_image(
                torch.zeros(1, 3, *self.image_size, device=self.device, dtype=self.dtype)
            )
        self.dim: int = probe.shape[-1]

    def __repr__(self) -> str:
        return f"ClipEncoder(name={self.name!r}, dim={self.dim}, image_size={self.image_size})"

    def pixels_from_tensors(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] floats in [0, 1] -> model input [N, 3, S, S], resized and normalised.

        Mirrors open_clip's eval transform (resize mode, interpolation, mean/std) on tensors, so
        no PIL round trip; differentiable, which reward backpropagation relies on.
        """
        cfg = self.preprocess_cfg
        interpolation = InterpolationMode(cfg.get("interpolation", "bicubic"))
        mode = cfg.get("resize_mode", "shortest")
        (th, tw), (h, w) = self.image_size, images.shape[-2:]
        x = images.float()
        if mode == "squash":
            x = TF.resize(x, [th, tw], interpolation, antialias=True)
        elif mode == "shortest" and th == tw:
            x = TF.center_crop(TF.resize(x, th, interpolation, antialias=True), [th, tw])
        else:  # "shortest" to a non-square size, or "longest" (fit inside, then pad)
            scale = max(th / h, tw / w) if mode == "shortest" else min(th / h, tw / w)
            size = [round(h * scale), round(w * scale)]
            x = TF.resize(x, size, interpolation, antialias=True)
            x = center_crop_or_pad(x, [th, tw], fill=cfg.get("fill_color", 0) / 255)
        # PIL clamps bicubic overshoot when it quantises to uint8; do the same for parity.
        x = x.clamp(0.0, 1.0)
        return TF.normalize(x, list(cfg["mean"]), list(cfg["std"]))

    def _pixels(self, items: Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        """A batch of any accepted inputs -> model input [B, 3, S, S]."""
        if isinstance(items, torch.Tensor):
            return self.pixels_from_tensors(items)
        pixels = []
        for item in items:
            if isinstance(item, torch.Tensor):
                pixels.append(self.pixels_from_tensors(item.unsqueeze(0))[0])
            else:
                pixels.append(self.preprocess(_open_image(item)))
        return torch.stack(pixels)

    @torch.no_grad()
    def encode_images(
        self, images: Sequence[ImageInput] | torch.Tensor, batch_size: int = 64, progress=True
    ) -> torch.Tensor:
        """Encode images to unit-norm features [N, D] (float32, CPU).

        `images`: a float tensor [N, 3, H, W] in [0, 1], or a sequence of file paths, PIL
        images and/or tensors [3, H, W] in [0, 1].
        """
        if isinstance(images, torch.Tensor):
            _check_tensor_images(images, "images")
        else:
            for i, item in enumerate(images):
                if isinstance(item, torch.Tensor):
                    _check_tensor_images(item.unsqueeze(0), f"images[{i}]")
        n = len(images)
        out = torch.empty(n, self.dim)
        bar = tqdm(total=n, unit="img", desc=f"encoding {self.name}", disable=not progress)
        for start in range(0, n, batch_size):
            pixels = self._pixels(images[start : start + batch_size])
            feats = self.model.encode_image(pixels.to(self.device, self.dtype), normalize=True)
            out[start : start + len(pixels)] = feats.float().cpu()
            bar.update(len(pixels))
        bar.close()
        return out


def _check_tensor_images(images: torch.Tensor, what: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise UserError(
            f"{what}: expected a float tensor [N, 3, H, W] in [0, 1], got {images.dtype} "
            f"{list(images.shape)}"
        )
    if images.numel() and not (
        torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    ):
        raise UserError(
            f"{what}: pixel values must be finite and in [0, 1]; rescale (x / 255) first"
        )


def _open_image(item: str | os.PathLike | Image.Image) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    path = Path(item)
    if not path.is_file():
        raise UserError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(
            f"{path}: not a readable image ({type(e).__name__}); re-export it"
        ) from None


# ---------------------------------------------------------------------------------------------
# Loading: four ways to name a model, one open_clip factory call each.
# ---------------------------------------------------------------------------------------------


def load_clip(
    model: str,
    pretrained: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    cache_dir: str | None = None,
) -> ClipEncoder:
    """Load an open_clip model as a `ClipEncoder`.

    model / pretrained:
      - "ViT-L-14" / "openai": an open_clip architecture and pretrained tag (downloaded into the
        Hugging Face cache, or `cache_dir`, on first use; `HF_HUB_OFFLINE=1` uses the cache only);
      - "ViT-B-32" / "/path/ckpt.safetensors": a local checkpoint for a named architecture;
      - "/path/dir" or "local-dir:/path/dir": open_clip's local layout (open_clip_config.json
        plus weights), pretrained must be None;
      - "hf-hub:org/name": a Hugging Face Hub repo, pretrained must be None.
    """
    if precision not in _DTYPES:
        raise UserError(f"precision={precision!r}: use one of {sorted(_DTYPES)}")
    if model.startswith("hf-hub:"):
        spec, name = model, None  # name found after loading, from the cached weights file
    elif model.startswith("local-dir:") or Path(model).is_dir():
        spec, name = _local_dir_spec(model.removeprefix("local-dir:"))
    else:
        spec, name = model, _named_model_identity(model, pretrained)
    if (spec.startswith(("hf-hub:", "local-dir:"))) and pretrained is not None:
        raise UserError(
            f"{model}: pretrained={pretrained!r} is ignored for hub ids and local dirs; "
            "drop it (the weights come from the repo/dir)"
        )
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            spec, pretrained=pretrained, precision=precision, device=device, cache_dir=cache_dir
        )
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise UserError(_load_failure_message(model, pretrained, e)) from None
    if name is None:
        name = _hub_identity(model.removeprefix("hf-hub:"), cache_dir)
    if precision != "fp32":
        name += f"|{precision}"  # low precision shifts features; keep its cache separate
    return ClipEncoder(clip, preprocess, name, device=device, precision=precision)


def _local_dir_spec(directory: str) -> tuple[str, str]:
    path = Path(directory).expanduser().resolve()
    config = path / "open_clip_config.json"
    if not config.is_file():
        raise UserError(
            f"{path}: no open_clip_config.json; a local model dir needs it plus a weights file "
            "(open_clip's save_for_hf writes both)"
        )
    weights = _find_checkpoint_in_dir(path)  # the same choice open_clip makes when loading
    if weights is None:
        raise UserError(
            f"{path}: no weights (*.safetensors, *.bin, *.pth) next to open_clip_config.json"
        )
    digest = hashlib.sha256((file_sha256(config) + file_sha256(weights)).encode()).hexdigest()
    return f"local-dir:{path}", f"local-dir:{path.name}@{digest[:16]}"


def _named_model_identity(model: str, pretrained: str | None) -> str:
    if model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(
            f"unknown open_clip model {model!r}{hint}; list valid names with {_LIST_MODELS}, "
            "or pass a local model dir or hf-hub:org/name"
        )
    tags = open_clip.list_pretrained_tags_by_model(model)
    see_tags = f"e.g. {tags[:3]}; all: open_clip.list_pretrained_tags_by_model({model!r})"
    if pretrained is None:
        # Random weights would give meaningless features under a name that cannot identify them.
        raise UserError(
            f"{model}: no weights given; pass pretrained=<tag> ({see_tags}) or a checkpoint file"
        )
    if os.path.isfile(pretrained):
        return f"{model}:file@{file_sha256(pretrained)[:16]}"
    if open_clip.get_pretrained_cfg(model, pretrained):
        return f"{model}:{pretrained}"  # a tag pins one published weights file
    if Path(pretrained).suffix or os.sep in pretrained:
        raise UserError(f"{pretrained}: checkpoint file not found")
    raise UserError(f"{model}: unknown pretrained tag {pretrained!r}; {see_tags}")


def _hub_identity(repo_id: str, cache_dir: str | None) -> str:
    """`hf-hub:org/name@<blob>`: the cache stores LFS files under their sha256, a free content hash."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    for filename in (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME):
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(cached, str):
            blob = Path(os.path.realpath(cached))
            # Caches without symlinks hold plain copies, which must be hashed.
            digest = blob.name if re.fullmatch(r"[0-9a-f]{40,64}", blob.name) else file_sha256(blob)
            return f"hf-hub:{repo_id}@{digest[:16]}"
    # open_clip only warns and keeps random weights when the hub has none; refuse that.
    raise UserError(
        f"hf-hub:{repo_id}: no {HF_SAFE_WEIGHTS_NAME} or {HF_WEIGHTS_NAME} could be fetched; "
        "check the repo id, or run once with network access to fill the cache"
    )


def _load_failure_message(model: str, pretrained: str | None, error: Exception) -> str:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    reason = reason if len(reason) <= 200 else reason[:200] + "..."
    if model.startswith("hf-hub:") or (
        pretrained and open_clip.get_pretrained_cfg(model, pretrained)
    ):
        from huggingface_hub import constants

        offline = (
            " (HF_HUB_OFFLINE is set, so only the local cache was searched)"
            if constants.HF_HUB_OFFLINE
            else ""
        )
        source = model if pretrained is None else f"{model} / {pretrained}"
        return (
            f"{source}: could not get the weights{offline}: {reason}. Run once with network access "
            "to cache them, or download the checkpoint and pass pretrained=/path/to/file"
        )
    return f"{model}{f' / {pretrained}' if pretrained else ''}: could not load the model: {reason}"


# ---------------------------------------------------------------------------------------------
# Cache: shards of (keys, features); the shards are the index.
# ---------------------------------------------------------------------------------------------


def image_key(item: ImageInput) -> bytes:
    """sha256 digest (32 bytes) of an image's content: file bytes, or pixels for in-memory images."""
    if isinstance(item, torch.Tensor):
        h = hashlib.sha256(f"tensor:{item.dtype}:{list(item.shape)}:".encode())
        h.update(item.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    elif isinstance(item, Image.Image):
        h = hashlib.sha256(f"pil:{item.mode}:{item.size}:".encode())
        h.update(item.tobytes())
    else:
        if not Path(item).is_file():
            raise UserError(f"{item}: image file not found")
        return bytes.fromhex(file_sha256(item))
    return h.digest()


class FeatureCache:
    """Features of `encoder` for any images, computed once and kept in `root` as shards.

    Layout: `root/<encoder slug>/shard-00000.safetensors`, each shard holding `keys` uint8
    [M, 32] (image sha256 digests), `features` float32 [M, D], and in its metadata the encoder
    name and a sha256 over both tensors. One writer at a time per directory.
    """

    def __init__(self, root: str | os.PathLike, encoder: ClipEncoder, shard_size: int = 4096):
        if shard_size < 1:
            raise UserError(f"shard_size={shard_size}: must be at least 1")
        self.encoder = encoder
        self.shard_size = shard_size
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder.name)[:64]
        self.dir = Path(root) / f"{slug}-{hashlib.sha256(encoder.name.encode()).hexdigest()[:12]}"
        self.num_encoded = 0  # images encoded by this object, for reports and tests

    def features(
        self, images: Sequence[ImageInput] | torch.Tensor, batch_size: int = 64
    ) -> torch.Tensor:
        """Unit-norm features [N, D] for `images` (paths, PIL images, tensors; see encode_images).

        Only images missing from the cache are encoded; every `shard_size` new images are written
        as one shard, so an interrupted run keeps all finished shards.
        """
        if isinstance(images, torch.Tensor):
            _check_tensor_images(images, "images")
        items = list(images)
        keys = [image_key(x) for x in tqdm(items, unit="img", desc="hashing", disable=None)]
        found = self._load(set(keys))
        missing: dict[bytes, ImageInput] = {}  # insertion-ordered, duplicates encoded once
        for key, item in zip(keys, items, strict=True):
            if key not in found:
                missing.setdefault(key, item)
        self._encode_missing(missing, found, batch_size)
        if not keys:
            return torch.empty(0, self.encoder.dim)
        return torch.stack([found[k] for k in keys])

    def _encode_missing(
        self, missing: dict[bytes, ImageInput], found: dict, batch_size: int
    ) -> None:
        todo = list(missing.items())
        bar = tqdm(
            total=len(todo), unit="img", desc=f"encoding {self.encoder.name}", disable=not todo
        )
        for start in range(0, len(todo), self.shard_size):
            chunk = todo[start : start + self.shard_size]
            chunk_images = [item for _, item in chunk]
            if all(isinstance(x, torch.Tensor) for x in chunk_images) and (
                len({x.shape for x in chunk_images}) == 1
            ):
                chunk_images = torch.stack(chunk_images)  # one vectorised resize per batch
            feats = self.encoder.encode_images(chunk_images, batch_size=batch_size, progress=False)
            chunk_keys = torch.tensor([list(k) for k, _ in chunk], dtype=torch.uint8)
            self._write_shard(chunk_keys, feats)
            found.update(zip([k for k, _ in chunk], feats, strict=True))
            self.num_encoded += len(chunk)
            bar.update(len(chunk))
        bar.close()

    def shard_paths(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.safetensors"))

    def _write_shard(self, keys: torch.Tensor, feats: torch.Tensor) -> Path:
        numbers = [
            int(m.group(1))
            for p in self.dir.glob("shard-*")
            if (m := re.match(r"shard-(\d+)", p.name))
        ]
        path = self.dir / f"shard-{max(numbers, default=-1) + 1:05d}.safetensors"
        feats = feats.float().contiguous()
        meta = {"encoder": self.encoder.name, "sha256": _checksum(keys, feats)}
        save_tensors(path, {"keys": keys, "features": feats}, metadata=meta)
        return path

    def _load(self, wanted: set[bytes]) -> dict[bytes, torch.Tensor]:
        """Read every shard, verify it, and return the rows whose key is in `wanted`."""
        found: dict[bytes, torch.Tensor] = {}
        for path in self.shard_paths():
            shard = self._read_shard(path)
            if shard is None:
                continue
            keys, feats = shard
            for i, key in enumerate(bytes(row) for row in keys.numpy()):
                if key in wanted:
                    found[key] = feats[i]
        return found

    def _read_shard(self, path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keys [M, 32], features [M, D]) of a sound shard; a damaged one is moved aside."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys, feats = f.get_tensor("keys"), f.get_tensor("features")
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            problem = f"unreadable ({type(e).__name__}: {str(e)[:80]})"
        else:
            problem = None
            if meta.get("encoder") != self.encoder.name:
                problem = f"written by encoder {meta.get('encoder')!r}"
            elif (
                keys.ndim != 2
                or keys.shape[1] != 32
                or feats.shape != (len(keys), self.encoder.dim)
            ):
                problem = (
                    f"shapes keys {list(keys.shape)} / features {list(feats.shape)} do not match"
                )
            elif meta.get("sha256") != _checksum(keys, feats):
                problem = "checksum mismatch"
        if problem is None:
            return keys, feats
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        warnings.warn(
            f"{path}: corrupt feature shard ({problem}); moved to {aside.name}, its images will be "
            "recomputed",
            stacklevel=3,
        )
        return None


def _checksum(keys: torch.Tensor, feats: torch.Tensor) -> str:
    h = hashlib.sha256(keys.numpy().tobytes())
    h.update(feats.numpy().tobytes())
    return h.hexdigest()


def list_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand directories into their image files (sorted, recursive); check files exist."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if has_image_suffix(f)))
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"{p}: no such image file or directory")
    return out


def extract_features(
    image_paths: Sequence[str | os.PathLike],
    model: str,
    pretrained: str | None,
    cache_dir: str | os.PathLike,
    batch_size: int = 64,
    device: str = "cpu",
    shard_size: int = 4096,
) -> tuple[list[Path], torch.Tensor, FeatureCache]:
    """The `reward-models features` command: cache features for image files/directories.

    Returns (image files in order, features [N, D], the cache: `.dir`, `.num_encoded`,
    `.encoder.name` for the summary line).
    """
    files = list_images(image_paths)
    if not files:
        raise UserError(
            f"{', '.join(map(str, image_paths))}: no images found ({', '.join(IMAGE_SUFFIXES)})"
        )
    cache = FeatureCache(
        cache_dir, load_clip(model, pretrained, device=device), shard_size=shard_size
    )
    return files, cache.features(files, batch_size=batch_size), cache
