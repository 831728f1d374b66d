"""The toy world's tiny CLIP: an open_clip model trained contrastively on toy image/caption pairs.

The architecture is an ordinary open_clip JSON config (`toy-clip.json`, registered as "toy-clip"),
the objective is open_clip's own `ClipLoss`, and the result is saved in open_clip's local-dir
layout, so it loads like any other open_clip checkpoint:

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(path))

`linear_probe_r2` measures what the frozen image features know about the pixel statistics the
gold raters score (luminance, colourfulness, warmth): the reward heads can only learn a taste the
features can express.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from tqdm.auto import tqdm

from plural_diffusion.toyworld.images import ToyImageSet, brightness_word, caption, make_images
from plural_diffusion.toyworld.raters import pixel_stats
from reward_models.config import to_dict
from reward_models.errors import UserError
from reward_models.io import atomic_dir, save_tensors, write_json

MODEL_NAME = "toy-clip"
MODEL_CONFIG_PATH = Path(__file__).with_name("toy-clip.json")
CONFIG_FILE = "open_clip_config.json"  # the names open_clip's local-dir loader looks for
WEIGHTS_FILE = "open_clip_model.safetensors"
IMAGE_SIZE = 32
# Held-out images for probes and retrieval come from a seed no training config uses by default.
PROBE_SEED = 1_000_003
PROBE_TARGETS = ("luminance", "colourfulness", "warmth", "brightness", "saturation")


def register_toy_clip() -> None:
    """Make "toy-clip" a model name open_clip knows (idempotent)."""
    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_PATH)


@dataclass
class ToyClipConfig:
    """Every hyper-parameter of `train_toy_clip`; the architecture lives in `toy-clip.json`."""

    n_images: int = 4000  # training pairs: make_images(n_images, 32, seed)
    epochs: int = 10
    batch_size: int = 128  # contrastive batch: each image's negatives are the other captions
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.1  # on weight matrices only, as open_clip's own training does
    warmup_frac: float = 0.1  # share of steps with linear warm-up; cosine decay to 0 after
    # The captions use 29 of the 49408 BPE tokens; training the whole embedding table would make
    # every AdamW step walk 3.2M parameters that never receive a gradient.
    freeze_token_embedding: bool = True
    # The model is so small that per-op overhead dominates; one thread avoids OpenMP barrier
    # waits and makes the weights independent of the machine's core count.
    num_threads: int = 1
    seed: int = 0  # images, initial weights and batch order


def _check_config(cfg: ToyClipConfig) -> None:
    for key in ("n_images", "epochs", "batch_size", "num_threads"):
        if getattr(cfg, key) < 1:
            raise UserError(f"toy-clip config '{key}' must be >= 1, got {getattr(cfg, key)}")
    if cfg.batch_size < 2 or cfg.batch_size > cfg.n_images:
        raise UserError(
            f"toy-clip config 'batch_size' must be in [2, n_images={cfg.n_images}], "
            f"got {cfg.batch_size}"
        )
    if not (cfg.lr > 0 and cfg.weight_decay >= 0 and 0 <= cfg.warmup_frac < 1):
        raise UserError(
            "toy-clip config needs lr > 0, weight_decay >= 0 and 0 <= warmup_frac < 1, got "
            f"lr={cfg.lr}, weight_decay={cfg.weight_decay}, warmup_frac={cfg.warmup_frac}"
        )


def _warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _fit(
    model: torch.nn.Module,
    pixels: torch.Tensor,  # [N, 3, 32, 32], already normalised
    tokens: torch.Tensor,  # [N, L] long
    cfg: ToyClipConfig,
    progress: bool,
) -> None:
    """Contrastive training in place: each image against every caption of its batch."""
    model.token_embedding.weight.requires_grad_(not cfg.freeze_token_embedding)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Gains, biases, embeddings' 1-d params and logit_scale are not decayed (open_clip's rule).
    decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    steps_per_epoch = pixels.shape[0] // cfg.batch_size  # drop the ragged last batch
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = max(1, round(cfg.warmup_frac * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(total_steps, warmup_steps)
    )
    loss_fn = ClipLoss()
    order = torch.Generator().manual_seed(cfg.seed)

    model.train()
    bar = tqdm(total=total_steps, desc="toy-clip", unit="step", disable=not progress)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(pixels.shape[0], generator=order)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            image_features, text_features, logit_scale = model(pixels[idx], tokens[idx])
            loss = loss_fn(image_features, text_features, logit_scale)
            if not torch.isfinite(loss):
                raise UserError(
                    f"toy-clip training diverged (loss {loss.item()}) at epoch {epoch}; "
                    f"lower 'lr' (now {cfg.lr})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # open_clip's training caps the temperature at 1/100
                model.logit_scale.clamp_(0, math.log(100))
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


def train_toy_clip(cfg: ToyClipConfig, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Train the tiny CLIP on `make_images(cfg.n_images, 32, cfg.seed)` and save it to `out_dir`.

    The directory holds `open_clip_config.json` (model_cfg, preprocess_cfg, and the train_cfg it
    came from) and `open_clip_model.safetensors`; it is written atomically and is the same, bit
    for bit, for the same config. Returns `out_dir`.
    """
    _check_config(cfg)
    register_toy_clip()
    data = make_images(cfg.n_images, IMAGE_SIZE, cfg.seed)
    # Normalise with the toy world's own per-channel statistics (rounded, so they read well in
    # the JSON), about 0.34 / 0.26 per channel; ImageNet's 0.46 / 0.27 would leave the inputs
    # off-centre.
    mean = [round(v, 4) for v in data.images.mean(dim=(0, 2, 3)).tolist()]
    std = [round(v, 4) for v in data.images.std(dim=(0, 2, 3)).tolist()]
    preprocess_cfg = {
        "size": IMAGE_SIZE,
        "mode": "RGB",
        "mean": mean,
        "std": std,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    pixels = (data.images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    tokens = open_clip.get_tokenizer(MODEL_NAME)(data.captions)  # [N, context_length]

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        # Seed a private copy of the global generator: open_clip initialises weights from it, and
        # the caller's random stream must not depend on whether a model was trained.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = open_clip.create_model(MODEL_NAME)
            _fit(model, pixels, tokens, cfg, progress)
    finally:
        torch.set_num_threads(threads)

    model_cfg = json.loads(MODEL_CONFIG_PATH.read_text())
    with atomic_dir(out_dir) as tmp:
        save_tensors(tmp / WEIGHTS_FILE, model.state_dict())
        write_json(
            tmp / CONFIG_FILE,
            {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg, "train_cfg": to_dict(cfg)},
        )
    return Path(out_dir)


def load_toy_clip(path: str | os.PathLike):
    """(model in eval mode, eval preprocess for PIL images, tokenizer) from a saved directory."""
    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise UserError(
                f"{path}: no {name}, so not a trained toy-clip directory; "
                "build one with train_toy_clip or `plural-diffusion toy prepare`"
            )
    spec = f"local-dir:{path}"
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    return model.eval(), preprocess, open_clip.get_tokenizer(spec)


def encode_images(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """L2-normalised image features [N, D] of images [N, 3, H, W] in [0, 1] (no gradients).

    The model's own mean/std normalisation is applied to the tensors directly, no PIL round trip;
    H, W must already be the model's input size. Features come back on the model's device.
    """
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != size:
        raise UserError(
            f"images must be [N, 3, {size[0]}, {size[1]}] in [0, 1], got {tuple(images.shape)}; "
            "resize them to the model's input size first"
        )
    param = next(model.parameters())
    mean = torch.tensor(cfg["mean"], device=param.device, dtype=param.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=param.device, dtype=param.dtype).view(1, 3, 1, 1)
    features = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(param.device, param.dtype)
            features.append(model.encode_image((x - mean) / std, normalize=True))
    return torch.cat(features)


def encode_texts(model: torch.nn.Module, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised text features [N, D] of `texts` (no gradients)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model.encode_text(tokenizer(list(texts)).to(device), normalize=True)


def linear_probe_r2(
    features: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray,
    train_frac: float = 0.7,
    seed: int = 0,
) -> list[float]:
    """Held-out R² of a ridge regression from frozen features [N, D] to each column of targets.

    targets is [N] or [N, T]. Rows are shuffled with `seed`, the first `train_frac` fit the probe
    (ridge strength chosen per target by leave-one-out on that split only), the rest score it.
    Returns T values; 1 is a perfect linear read-out, 0 is no better than the held-out mean.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise UserError(
            f"linear probe needs features [N, D] and targets [N] or [N, T] with the same N, "
            f"got {x.shape} and {y.shape}"
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise UserError("linear probe inputs contain NaN or inf; check the features and targets")
    n_train = round(train_frac * x.shape[0])
    if n_train < 5 or x.shape[0] - n_train < 5:
        raise UserError(
            f"linear probe needs >= 5 rows on each side of the split, got {x.shape[0]} rows "
            f"with train_frac={train_frac}"
        )
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    train, test = perm[:n_train], perm[n_train:]
    probe = RidgeCV(alphas=np.logspace(-4, 2, 13), alpha_per_target=True).fit(x[train], y[train])
    return r2_score(y[test], probe.predict(x[test]), multioutput="raw_values").tolist()


def probe_targets(images: ToyImageSet) -> torch.Tensor:
    """[N, 5] targets named by `PROBE_TARGETS`: three gold-rater pixel statistics, then the
    brightness and saturation attributes the image was rendered from."""
    stats = pixel_stats(images.images)[:, :3]  # luminance, colourfulness, warmth
    attrs = torch.tensor([[a.brightness, a.saturation] for a in images.attributes])
    return torch.cat([stats, attrs], dim=1)


def brightness_retrieval_accuracy(model, tokenizer, images: ToyImageSet) -> float:
    """Share of dark and bright images whose features are nearer to their own caption with the
    right brightness word than to the same caption with the opposite one."""
    rows, right, wrong = [], [], []
    for i, a in enumerate(images.attributes):
        word = brightness_word(a.brightness)
        if word == "medium":
            continue
        dark = caption(dataclasses.replace(a, brightness=0.1))
        bright = caption(dataclasses.replace(a, brightness=0.9))
        rows.append(i)
        right.append(dark if word == "dark" else bright)
        wrong.append(bright if word == "dark" else dark)
    image_features = encode_images(model, images.images[rows])
    right_sim = (image_features * encode_texts(model, tokenizer, right)).sum(-1)
    wrong_sim = (image_features * encode_texts(model, tokenizer, wrong)).sum(-1)
    return (right_sim > wrong_sim).float().mean().item()


def evaluate_toy_clip(
    model: torch.nn.Module, tokenizer, n_images: int = 1000, seed: int = PROBE_SEED
) -> dict[str, float]:
    """Probe R² per `PROBE_TARGETS` name and dark/bright retrieval accuracy on held-out images."""
    held_out = make_images(n_images, IMAGE_SIZE, seed)
    r2 = linear_probe_r2(encode_images(model, held_out.images), probe_targets(held_out))
    metrics = {f"r2_{name}": value for name, value in zip(PROBE_TARGETS, r2, strict=True)}
    metrics["retrieval_dark_bright"] = brightness_retrieval_accuracy(model, tokenizer, held_out)
    return metrics
