"""Fit a reward head on tensors: MSE on raters' scores, Bradley-Terry on their pairwise choices.

    history = fit_head(head, scores=ScoreSet(features, rater, score), cfg=TrainHeadConfig())

Both losses go through `head.predict_rating(features, rater)`, the rating on the rater's own
scale, so a rater-aware head learns each rater's calibration from scores, and from pairs learns
utilities whose differences are log-odds (Bradley-Terry: P(a > b) = sigmoid(rating_a - rating_b);
the per-rater offset cancels there, the scale acts as the rater's decisiveness).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from reward_models.errors import UserError
from reward_models.heads import RewardHead


@dataclass
class ScoreSet:
    """Absolute ratings: rater[i] gave score[i] to the image with features[item[i]].

    features [M, D] float (L2-normalised CLIP embeddings); rater [N] long; score [N] float on
    the raters' own scale; item [N] long, or None when row i of `features` is rating i (M = N).
    """

    features: torch.Tensor
    rater: torch.Tensor
    score: torch.Tensor
    item: torch.Tensor | None = None


@dataclass
class PairSet:
    """Pairwise choices: rater[j] compared images idx_a[j] and idx_b[j] (rows of `features`).

    features [M, D]; idx_a, idx_b, rater [P] long; winner [P] float: 0 when a was preferred,
    1 when b was, 0.5 for a tie.
    """

    features: torch.Tensor
    idx_a: torch.Tensor
    idx_b: torch.Tensor
    rater: torch.Tensor
    winner: torch.Tensor


@dataclass
class TrainHeadConfig:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-2  # AdamW, decoupled; also keeps the taste table small
    holdout_fraction: float = 0.1  # of ratings and of pairs, for early stopping; 0 disables it
    patience: int = 10  # epochs without a better held-out loss before stopping
    pair_loss_weight: float = 1.0  # Bradley-Terry loss weight when scores and pairs are both given
    seed: int = 0
    progress: bool = True  # tqdm bar over epochs
    device: str = "cpu"


class EarlyStopping:
    """The best weights seen under a held-out loss, and whether `patience` checks in a row have
    failed to lower it by more than `min_delta` (shared by every fitting loop here)."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.bad, self.state = math.inf, 0, None

    def update(self, loss: float, module: torch.nn.Module) -> bool:
        """Record a held-out loss; True when it is a new best (its weights are kept)."""
        if loss < self.best - self.min_delta:
            self.best, self.bad = loss, 0
            self.state = copy.deepcopy(module.state_dict())
            return True
        self.bad += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.bad >= self.patience

    def restore(self, module: torch.nn.Module) -> bool:
        """Load the best weights into `module`; False when no loss was ever recorded."""
        if self.state is None:
            return False
        module.load_state_dict(self.state)
        return True


@dataclass
class TrainHistory:
    """Per-epoch mean losses; the head ends with the weights of `best_epoch`."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)  # empty without a held-out split
    best_epoch: int = -1
    stopped_early: bool = False


def _check(head: RewardHead, features: torch.Tensor, name: str, **index: torch.Tensor) -> int:
    """Validate one data set against the head; return its number of rows."""
    if features.ndim != 2 or features.shape[1] != head.feature_dim:
        raise UserError(
            f"{name}: features have shape {tuple(features.shape)} but the "
            f"{head.kind} head expects [M, {head.feature_dim}]"
        )
    if not torch.isfinite(features).all():
        raise UserError(f"{name}: features contain NaN or inf; re-extract them")
    sizes = {k: v.shape[0] for k, v in index.items() if v is not None}
    if len(set(sizes.values())) != 1 or any(v.ndim != 1 for v in index.values() if v is not None):
        raise UserError(f"{name}: {', '.join(sizes)} must be 1-d of one length, got {sizes}")
    n_raters = getattr(head.config, "n_raters", None)
    rater = index["rater"]
    if n_raters is not None and rater.numel() and (rater.min() < 0 or rater.max() >= n_raters):
        raise UserError(
            f"{name}: rater indices span {rater.min().item()}..{rater.max().item()} "
            f"but the head has {n_raters} raters; build it with n_raters={rater.max().item() + 1}"
        )
    for key in ("item", "idx_a", "idx_b"):
        idx = index.get(key)
        if idx is not None and idx.numel() and (idx.min() < 0 or idx.max() >= features.shape[0]):
            raise UserError(
                f"{name}: {key} refers to row {idx.max().item()} of "
                f"{features.shape[0]} feature rows"
            )
    n = next(iter(sizes.values()))
    if "item" in index and index["item"] is None and features.shape[0] != n:
        raise UserError(
            f"{name}: without item indices, features need one row per rating "
            f"({n}), got {features.shape[0]}"
        )
    return n


def _score_loss(head: RewardHead, data: ScoreSet, rows: torch.Tensor) -> torch.Tensor:
    item = rows if data.item is None else data.item[rows]
    pred = head.predict_rating(data.features[item], data.rater[rows])
    return F.mse_loss(pred, data.score[rows])


def _pair_loss(head: RewardHead, data: PairSet, rows: torch.Tensor) -> torch.Tensor:
    rater = data.rater[rows]
    # one forward pass over [a; b] so dropout and the null-taste draw see both halves alike
    feats = torch.cat([data.features[data.idx_a[rows]], data.features[data.idx_b[rows]]])
    rating = head.predict_rating(feats, torch.cat([rater, rater]))
    rating_a, rating_b = rating.chunk(2)
    p_a = 1.0 - data.winner[rows]  # target probability that a is preferred
    return F.binary_cross_entropy_with_logits(rating_a - rating_b, p_a)


def _prepare_scores(head: RewardHead, scores: ScoreSet, device: torch.device) -> ScoreSet:
    _check(
        head, scores.features, "scores", rater=scores.rater, score=scores.score, item=scores.item
    )
    if not torch.isfinite(scores.score).all():
        raise UserError("scores: score contains NaN or inf; drop or fix those ratings")
    return ScoreSet(
        scores.features.float().to(device),
        scores.rater.long().to(device),
        scores.score.float().to(device),
        None if scores.item is None else scores.item.long().to(device),
    )


def _prepare_pairs(head: RewardHead, pairs: PairSet, device: torch.device) -> PairSet:
    index = {"rater": pairs.rater, "idx_a": pairs.idx_a, "idx_b": pairs.idx_b}
    _check(head, pairs.features, "pairs", **index, winner=pairs.winner)
    winner = pairs.winner
    if not torch.isfinite(winner).all() or ((winner < 0) | (winner > 1)).any():
        raise UserError("pairs: winner must be 0 (a preferred), 1 (b preferred) or 0.5 (tie)")
    return PairSet(
        pairs.features.float().to(device),
        pairs.idx_a.long().to(device),
        pairs.idx_b.long().to(device),
        pairs.rater.long().to(device),
        winner.float().to(device),
    )


@torch.no_grad()
def _mean_loss(head: RewardHead, loss_fn, data, rows: torch.Tensor, batch_size: int) -> float:
    """Mean of a per-row-averaged loss over `rows`, in batches (held-out sets can be large)."""
    total = sum(loss_fn(head, data, chunk).item() * len(chunk) for chunk in rows.split(batch_size))
    return total / len(rows)


def _split(n: int, fraction: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=g)
    n_val = int(round(n * fraction)) if n > 1 else 0
    return perm[n_val:], perm[:n_val]


def _batches(rows: torch.Tensor, n_steps: int, batch_size: int, g: torch.Generator):
    """`n_steps` shuffled batches of `rows`, wrapping around when the set is the smaller one."""
    order = rows[torch.randperm(rows.numel(), generator=g)]
    reps = math.ceil(n_steps * batch_size / max(order.numel(), 1))
    order = order.repeat(max(reps, 1))
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(n_steps)]


def fit_head(
    head: RewardHead,
    scores: ScoreSet | None = None,
    pairs: PairSet | None = None,
    cfg: TrainHeadConfig | None = None,
) -> TrainHistory:
    """Train `head` in place with AdamW on MSE (scores), Bradley-Terry (pairs), or their sum.

    A `holdout_fraction` of the ratings and of the pairs is held out; training stops after
    `patience` epochs without a lower held-out loss and the best weights are restored. Seeded:
    the same data, config and initial head give the same result.
    """
    cfg = cfg or TrainHeadConfig()
    if scores is None and pairs is None:
        raise UserError("fit_head needs scores=ScoreSet(...), pairs=PairSet(...), or both")
    if not 0.0 <= cfg.holdout_fraction < 1.0 or cfg.batch_size < 1 or cfg.epochs < 1:
        raise UserError(
            f"bad training config: holdout_fraction={cfg.holdout_fraction} must be in "
            f"[0, 1), batch_size={cfg.batch_size} and epochs={cfg.epochs} >= 1"
        )
    device = torch.device(cfg.device)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout and the null-taste draws use the global generator
    head.to(device)

    sets = {}  # name -> (data on device, loss function, train rows, held-out rows)
    if scores is not None:
        data = _prepare_scores(head, scores, device)
        sets["scores"] = (data, _score_loss, *_split(len(data.rater), cfg.holdout_fraction, g))
    if pairs is not None:
        data = _prepare_pairs(head, pairs, device)
        sets["pairs"] = (data, _pair_loss, *_split(len(data.rater), cfg.holdout_fraction, g))
    for name, (_, _, train, _) in sets.items():
        if train.numel() == 0:
            raise UserError(
                f"{name}: no rows left for training after holding out "
                f"{cfg.holdout_fraction:.0%}; give more data or a smaller holdout_fraction"
            )
    weights = {"scores": 1.0, "pairs": cfg.pair_loss_weight}
    use_val = all(val.numel() > 0 for *_, val in sets.values()) and cfg.holdout_fraction > 0

    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = TrainHistory()
    stopper = EarlyStopping(cfg.patience, min_delta=1e-6)
    n_steps = max(math.ceil(train.numel() / cfg.batch_size) for _, _, train, _ in sets.values())

    bar = tqdm(range(cfg.epochs), desc=f"fit {head.kind} head", disable=not cfg.progress)
    for epoch in bar:
        # training: each step sees one batch of every data set given
        head.train()
        batches = {
            k: _batches(train, n_steps, cfg.batch_size, g) for k, (_, _, train, _) in sets.items()
        }
        total = 0.0
        for step in range(n_steps):
            loss = sum(
                weights[k] * fn(head, data, batches[k][step])
                for k, (data, fn, _, _) in sets.items()
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        history.train_loss.append(total / n_steps)

        if not use_val:
            history.best_epoch = epoch
            bar.set_postfix(train=f"{history.train_loss[-1]:.4f}")
            continue
        # early stopping on the held-out rows, without dropout or null-taste draws
        head.eval()
        val = sum(
            weights[k] * _mean_loss(head, fn, data, held, cfg.batch_size)
            for k, (data, fn, _, held) in sets.items()
        )
        history.val_loss.append(val)
        bar.set_postfix(train=f"{history.train_loss[-1]:.4f}", val=f"{val:.4f}")
        if stopper.update(val, head):
            history.best_epoch = epoch
        elif stopper.exhausted:
            history.stopped_early = True
            break

    stopper.restore(head)
    head.eval()
    return history
