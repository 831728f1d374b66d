"""Reward heads on CLIP image features: one scoring interface, one factory, one file format.

Every head scores L2-normalised image features under an optional taste vector:

    head.score(features, z) -> scores          # features [B, D], z [B, d] or None -> [B]

`MeanHead` is the classic single-score MLP (one utility for everyone, `z` ignored); `RaterHead`
is the rater-aware r(x, z) with a learned taste per rater and a per-rater calibration. Heads are
built from a config dataclass that names the `kind` and the sizes (open_clip style):

    head = build_head(RaterHeadConfig(feature_dim=768, n_raters=40))
    save_head(head, "runs/heads/rater")        # head_config.json + head.safetensors, atomically
    head = load_head("runs/heads/rater", feature_dim=768)

A new kind of head registers its class in `HEAD_KINDS` with the `register_head` decorator and is
then built, saved and loaded by the same three functions. This module imports no other head
module: the research heads (`reward_models.research`: latent, mdn) register themselves when that
package is imported, as `reward_models.workflow` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from reward_models.config import from_dict, to_dict
from reward_models.errors import UserError
from reward_models.io import atomic_dir, load_tensors, read_json, save_tensors, write_json

CONFIG_NAME = "head_config.json"
WEIGHTS_NAME = "head.safetensors"
FORMAT_VERSION = 1
NULL_RATER = -1  # rater index meaning "no preference": selects the learned null taste

# The LAION aesthetic predictor v2 (improved-aesthetic-predictor): Linear layers at these
# nn.Sequential indices, Dropout at 1, 3, 5, no activations. [out, in] of each weight.
_LAION_INDICES = (0, 2, 4, 6, 7)
_LAION_HIDDEN = (1024, 128, 64, 16)


@dataclass
class MeanHeadConfig:
    """A single-score MLP: features [B, D] -> hidden_dims -> 1."""

    kind: Literal["mean"] = "mean"
    feature_dim: int = 768
    hidden_dims: tuple[int, ...] = (256, 64)
    activation: Literal["gelu", "relu", "none"] = "gelu"  # "none": the LAION linear chain
    dropout: float = 0.1


@dataclass
class RaterHeadConfig:
    """A taste-conditioned head r(x, z) with a learned taste z and calibration per rater."""

    kind: Literal["rater"] = "rater"
    feature_dim: int = 768
    n_raters: int = 1
    taste_dim: int = 8
    hidden_dims: tuple[int, ...] = (256, 64)
    # how z enters: "film" scales/shifts the first hidden layer; "concat" feeds [x, z] to the
    # MLP; "bilinear" is r = <a(z), phi(x)>. See RaterHead's docstring for the measurements.
    conditioning: Literal["film", "concat", "bilinear"] = "film"
    activation: Literal["gelu", "relu"] = "gelu"
    dropout: float = 0.1
    # in training, this fraction of ratings sees the null taste instead of the rater's, so the
    # null taste learns the "no preference" (population) utility, as classifier-free guidance does
    null_taste_prob: float = 0.1


HeadConfig = MeanHeadConfig | RaterHeadConfig


class RewardHead(nn.Module):
    """What the trainer sees of every head: `score(features, z)` and `predict_rating`."""

    kind: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config):
        super().__init__()
        self.config = config

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def taste_dim(self) -> int:
        """Size d of the taste vector z; 0 for heads that ignore taste."""
        return getattr(self.config, "taste_dim", 0)

    def score(self, features: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Utility of each image for taste z: features [B, D], z [B, d] or None -> [B]."""
        raise NotImplementedError

    def predict_rating(self, features: torch.Tensor, rater: torch.Tensor) -> torch.Tensor:
        """The score rater `rater[i]` would give image i, on the raters' scale, [B].

        Taste-blind heads predict the same rating for every rater.
        """
        return self.score(features, None)

    def forward(self, features: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.score(features, z)

    def check_features(self, features: torch.Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            got = features.shape[-1] if features.ndim >= 1 else 0
            raise UserError(
                f"{self.kind} head expects features of dimension {self.feature_dim}, got "
                f"{got} (tensor shape {tuple(features.shape)}); extract features with the "
                "CLIP model the head was trained on"
            )


HEAD_KINDS: dict[str, type[RewardHead]] = {}


def _known_kinds() -> str:
    return (
        f"known: {', '.join(sorted(HEAD_KINDS))}; the research heads (latent, mdn) register "
        "when reward_models.research is imported"
    )


def register_head(cls: type[RewardHead]) -> type[RewardHead]:
    """Class decorator: make `cls` buildable and loadable under `cls.kind`."""
    assert cls.kind not in HEAD_KINDS, f"head kind {cls.kind!r} registered twice"
    HEAD_KINDS[cls.kind] = cls
    return cls


def _activation(name: str) -> nn.Module | None:
    return {"gelu": nn.GELU(), "relu": nn.ReLU(), "none": None}[name]


def _mlp(dims: list[int], activation: str, dropout: float) -> nn.Sequential:
    """Linear layers dims[0] -> ... -> dims[-1]; activation and dropout after all but the last."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            act = _activation(activation)
            if act is not None:
                layers.append(act)
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


@register_head
class MeanHead(RewardHead):
    """One utility for everyone: an MLP features [B, D] -> [B]; the taste z is ignored."""

    kind = "mean"
    config_class = MeanHeadConfig

    def __init__(self, config: MeanHeadConfig):
        super().__init__(config)
        self.layers = _mlp(
            [config.feature_dim, *config.hidden_dims, 1], config.activation, config.dropout
        )

    def score(self, features: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        self.check_features(features)
        return self.layers(features).squeeze(-1)

    @classmethod
    def from_laion_checkpoint(cls, path: str | Path) -> MeanHead:
        """Load the LAION aesthetic predictor v2 (e.g. `sac+logos+ava1-l14-linearMSE.pth`).

        The file is an nn.Sequential state dict: Linear layers `layers.{0,2,4,6,7}` of shapes
        1024x768, 128x1024, 64x128, 16x64, 1x16 with dropout between and no activations. It
        expects L2-normalised CLIP ViT-L/14 image features [B, 768] and scores roughly 1..10.
        """
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: LAION aesthetic checkpoint not found")
        try:
            # saved from CUDA; weights_only refuses pickled code in a downloaded file
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a damaged or foreign file
            raise UserError(
                f"{path}: not a readable torch checkpoint ({type(e).__name__})"
            ) from None
        expected = {f"layers.{i}.{p}" for i in _LAION_INDICES for p in ("weight", "bias")}
        if not isinstance(state, dict) or set(state) != expected:
            keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
            raise UserError(
                f"{path}: not a LAION aesthetic predictor v2 state dict (expected keys "
                f"layers.{{0,2,4,6,7}}.weight/bias, found {keys})"
            )
        feature_dim = state["layers.0.weight"].shape[1]
        dims = [feature_dim, *_LAION_HIDDEN, 1]
        for i, d_in, d_out in zip(_LAION_INDICES, dims[:-1], dims[1:], strict=True):
            w, b = state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
            if tuple(w.shape) != (d_out, d_in) or tuple(b.shape) != (d_out,):
                raise UserError(
                    f"{path}: layers.{i} has weight {tuple(w.shape)} and bias {tuple(b.shape)}, "
                    f"expected ({d_out}, {d_in}) and ({d_out},) for a LAION aesthetic predictor v2"
                )
        head = cls(
            MeanHeadConfig(
                feature_dim=feature_dim, hidden_dims=_LAION_HIDDEN, activation="none", dropout=0.2
            )
        )
        linears = [m for m in head.layers if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for linear, i in zip(linears, _LAION_INDICES, strict=True):
                linear.weight.copy_(state[f"layers.{i}.weight"].float())
                linear.bias.copy_(state[f"layers.{i}.bias"].float())
        return head.eval()


@register_head
class RaterHead(RewardHead):
    """r(x, z): a taste-conditioned utility, a taste per rater, and each rater's calibration.

    Each rater i has a learned taste z_i (`taste_of(i)`), and an offset b_i and scale s_i > 0 so
    that a harsh and a generous rater can share one taste:

        predict_rating(x, i) = b_i + s_i * r(x, z_i)         # the rater's own scale
        score(x, z)          = r(x, z)                       # calibration-free utility

    `score(x, None)` uses the learned null taste ("no preference").

    How z enters was chosen by measurement on the synthetic +w.x / -w.x world of test_heads.py
    and on a bump-utility variant of it (3 seeds each, taste_dim 4, hidden (64, 32), 1 CPU
    thread): the worst group's pairwise accuracy was equal within noise for all three forms
    (0.98 on the linear world; 0.92-0.95 on the bump world); FiLM trained fastest and its
    tastes clustered most cleanly (BIC chose the true K in 5 of 6 runs, 3 of 6 for the others).
    """

    kind = "rater"
    config_class = RaterHeadConfig

    def __init__(self, config: RaterHeadConfig):
        super().__init__(config)
        if config.n_raters < 1 or config.taste_dim < 1 or not config.hidden_dims:
            raise UserError(
                "rater head needs n_raters >= 1, taste_dim >= 1 and at least one hidden layer "
                f"(got n_raters={config.n_raters}, taste_dim={config.taste_dim}, "
                f"hidden_dims={list(config.hidden_dims)})"
            )
        d, hidden = config.taste_dim, list(config.hidden_dims)
        # small init: tastes start near the null taste and spread only as the data asks
        self.taste_table = nn.Embedding(config.n_raters, d)
        nn.init.normal_(self.taste_table.weight, std=0.1)
        self.null_taste = nn.Parameter(torch.zeros(d))
        self.rater_offset = nn.Parameter(torch.zeros(config.n_raters))
        self.rater_log_scale = nn.Parameter(torch.zeros(config.n_raters))  # scale = exp(.) > 0

        if config.conditioning == "concat":
            self.body = _mlp(
                [config.feature_dim + d, *hidden, 1], config.activation, config.dropout
            )
        elif config.conditioning == "film":
            self.trunk = nn.Linear(config.feature_dim, hidden[0])
            self.film = nn.Linear(d, 2 * hidden[0])
            nn.init.zeros_(self.film.weight)  # starts as the identity modulation
            nn.init.zeros_(self.film.bias)
            self.act = _activation(config.activation)
            self.drop = nn.Dropout(config.dropout)
            self.body = _mlp([*hidden, 1], config.activation, config.dropout)
        else:  # bilinear: r = <A z + a0, phi(x)>
            self.body = _mlp([config.feature_dim, *hidden], config.activation, config.dropout)
            self.taste_proj = nn.Linear(d, hidden[-1])

    def taste_of(self, rater: torch.Tensor) -> torch.Tensor:
        """Taste vectors of raters [B] (long; NULL_RATER = -1 for no preference) -> [B, d]."""
        rater = self._check_raters(rater, allow_null=True)
        z = self.taste_table(rater.clamp(min=0))
        return torch.where((rater == NULL_RATER)[:, None], self.null_taste.expand_as(z), z)

    def rater_tastes(self) -> torch.Tensor:
        """The learned taste of every rater, [R, d], detached (what clusters are fit on)."""
        return self.taste_table.weight.detach().clone()

    def score(self, features: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        self.check_features(features)
        if z is None:
            z = self.null_taste.expand(features.shape[0], -1)
        if z.shape != (features.shape[0], self.taste_dim):
            raise UserError(
                f"rater head expects taste vectors z of shape [{features.shape[0]}, "
                f"{self.taste_dim}] for {features.shape[0]} images, got {tuple(z.shape)}"
            )
        cond = self.config.conditioning
        if cond == "concat":
            return self.body(torch.cat([features, z], dim=-1)).squeeze(-1)
        if cond == "film":
            gamma, beta = self.film(z).chunk(2, dim=-1)
            h = self.trunk(features) * (1 + gamma) + beta  # [B, H0]
            return self.body(self.drop(self.act(h))).squeeze(-1)
        return (self.body(features) * self.taste_proj(z)).sum(-1)

    def predict_rating(self, features: torch.Tensor, rater: torch.Tensor) -> torch.Tensor:
        rater = self._check_raters(rater, allow_null=False)
        z = self.taste_of(rater)
        p = self.config.null_taste_prob
        if self.training and p > 0:
            drop = torch.rand(rater.shape, device=rater.device) < p
            z = torch.where(drop[:, None], self.null_taste.expand_as(z), z)
        utility = self.score(features, z)
        return self.rater_offset[rater] + self.rater_log_scale[rater].exp() * utility

    def _check_raters(self, rater: torch.Tensor, allow_null: bool) -> torch.Tensor:
        rater = torch.as_tensor(rater, device=self.null_taste.device).long().reshape(-1)
        low = NULL_RATER if allow_null else 0
        if rater.numel() and (rater.min() < low or rater.max() >= self.config.n_raters):
            bad = rater[(rater < low) | (rater >= self.config.n_raters)][0].item()
            raise UserError(
                f"rater index {bad} out of range: this head knows raters 0..{self.config.n_raters - 1}"
                + (" (and -1 for no preference)" if allow_null else "")
            )
        return rater


def build_head(config: HeadConfig) -> RewardHead:
    """The head named by `config.kind`, freshly initialised."""
    cls = HEAD_KINDS.get(config.kind)
    if cls is None:
        raise UserError(f"unknown head kind {config.kind!r} ({_known_kinds()})")
    assert isinstance(config, cls.config_class), f"{type(config).__name__} for kind {config.kind}"
    hidden = getattr(config, "hidden_dims", ())
    if config.feature_dim < 1 or any(h < 1 for h in hidden):
        raise UserError(
            f"head sizes must be positive (feature_dim={config.feature_dim}, "
            f"hidden_dims={list(hidden)})"
        )
    return cls(config)


def save_head(head: RewardHead, directory: str | Path, metadata: dict | None = None) -> None:
    """Write `directory/head_config.json` and `head.safetensors` in one atomic step.

    `metadata` (JSON-able: the CLIP model name, rater ids, ...) is stored beside the config and
    returned by `read_head_metadata`.
    """
    record = {
        "format_version": FORMAT_VERSION,
        "config": to_dict(head.config),
        "metadata": metadata or {},
    }
    with atomic_dir(directory) as tmp:
        write_json(tmp / CONFIG_NAME, record)
        save_tensors(tmp / WEIGHTS_NAME, head.state_dict())


def _read_record(directory: Path) -> dict:
    record = read_json(directory / CONFIG_NAME)
    if record.get("format_version") != FORMAT_VERSION or "config" not in record:
        raise UserError(
            f"{directory / CONFIG_NAME}: not a head config of format "
            f"{FORMAT_VERSION}; save the head again with save_head"
        )
    return record


def read_head_metadata(directory: str | Path) -> dict:
    """The `metadata` dict a head was saved with."""
    return _read_record(Path(directory))["metadata"]


def load_head(directory: str | Path, feature_dim: int | None = None) -> RewardHead:
    """Rebuild a saved head (in eval mode); `feature_dim`, if given, must match the head's."""
    directory = Path(directory)
    data = dict(_read_record(directory)["config"])
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in HEAD_KINDS:
        raise UserError(f"{directory / CONFIG_NAME}: unknown head kind {kind!r} ({_known_kinds()})")
    config = from_dict(HEAD_KINDS[kind].config_class, data)
    if feature_dim is not None and feature_dim != config.feature_dim:
        raise UserError(
            f"{directory}: head was trained on {config.feature_dim}-dim features but the "
            f"features here are {feature_dim}-dim; use the CLIP model the head was trained on"
        )
    head = build_head(config)
    state = load_tensors(directory / WEIGHTS_NAME)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1:2] or [str(e)]
        raise UserError(
            f"{directory / WEIGHTS_NAME}: weights do not fit the config ({first[0].strip()})"
        ) from None
    return head.eval()
