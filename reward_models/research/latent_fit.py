"""Train a latent taste head with an ELBO over users (evaluation: reward_models.research.latent_eval).

    history = fit_latent(head, scores=ScoreSet(...), pairs=PairSet(...), cfg=LatentTrainConfig())

Each training step is a batch of episodes, one per user: a random context of 2..50 of the user's
examples goes to the encoder, and the likelihood is taken on a disjoint *target* set of the same
user's examples, so the head learns to predict ratings the encoder did not see:

    loss = mean_users [ -E_q(z|context) log p(target | z) + beta_t * KL(q || N(0, I)) / n_target ]

beta_t rises linearly from 0 to `kl_weight` over `kl_anneal_steps` (KL annealing, so the decoder
learns to use z before the KL pulls the posteriors to the prior).

The likelihood is the head's own (`LatentHeadConfig.likelihood`, offset-free; see
reward_models.research.latent), and the head's `score_scale` is set here from the training scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from reward_models.errors import UserError
from reward_models.research.latent import Context, ContextBatch, LatentHead
from reward_models.train import EarlyStopping, PairSet, ScoreSet


@dataclass
class LatentTrainConfig:
    steps: int = 2000
    users_per_batch: int = 32
    min_context: int = 2
    max_context: int = 50
    max_target: int = 50
    kl_weight: float = 1.0  # 1.0 is the ELBO (per target example)
    kl_anneal_steps: int = 500  # beta rises linearly from 0 over this many steps
    n_z_samples: int = 4  # posterior draws per episode
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_users: float = 0.1  # fraction of users held out for early stopping; 0 disables it
    eval_every: int = 100  # steps between held-out evaluations
    patience: int = 5  # evaluations without improvement before stopping
    seed: int = 0
    progress: bool = False
    device: str = "cpu"


@dataclass
class LatentHistory:
    train_loss: list[float] = field(default_factory=list)  # per eval_every-step window
    val_loss: list[float] = field(default_factory=list)
    best_step: int = -1
    stopped_early: bool = False


@dataclass
class UserRows:
    """Row indices of each user's scores and pairs (in a ScoreSet / PairSet)."""

    ids: list[int]  # rater indices
    score_rows: list[torch.Tensor]
    pair_rows: list[torch.Tensor]


def group_by_user(scores: ScoreSet | None, pairs: PairSet | None, min_examples: int) -> UserRows:
    """Each rater with at least `min_examples` scores + pairs, and the rows that are theirs."""
    raters = set()
    for data in (scores, pairs):
        if data is not None:
            raters |= set(data.rater.tolist())
    users = UserRows([], [], [])
    none = torch.zeros(0, dtype=torch.long)
    for r in sorted(raters):
        s = none if scores is None else (scores.rater == r).nonzero()[:, 0]
        p = none if pairs is None else (pairs.rater == r).nonzero()[:, 0]
        if len(s) + len(p) >= min_examples:
            users.ids.append(r)
            users.score_rows.append(s)
            users.pair_rows.append(p)
    return users


def user_examples(
    s_rows: torch.Tensor,
    p_rows: torch.Tensor,
    part: torch.Tensor,
    scores: ScoreSet | None,
    pairs: PairSet | None,
) -> Context:
    """The examples `part` of one user's list (their scores s_rows, then their pairs p_rows)."""
    n_s = len(s_rows)
    ctx = Context()
    if scores is not None:
        rows = s_rows[part[part < n_s]]
        item = rows if scores.item is None else scores.item[rows]
        ctx.features, ctx.scores = scores.features[item], scores.score[rows]
    if pairs is not None:
        rows = p_rows[part[part >= n_s] - n_s]
        ctx.features_a = pairs.features[pairs.idx_a[rows]]
        ctx.features_b = pairs.features[pairs.idx_b[rows]]
        ctx.winner = pairs.winner[rows]
    return ctx


def _episodes(
    head: LatentHead,
    users: UserRows,
    batch: list[int],
    scores: ScoreSet | None,
    pairs: PairSet | None,
    cfg: LatentTrainConfig,
    g: torch.Generator,
) -> tuple[ContextBatch, ContextBatch]:
    """Disjoint random context (min..max_context examples) and target sets for users `batch`."""
    ctx, tgt = [], []
    for u in batch:
        s_rows, p_rows = users.score_rows[u], users.pair_rows[u]
        total = len(s_rows) + len(p_rows)
        hi = min(cfg.max_context, total - 2)  # keep >= 2 targets
        k = int(torch.randint(cfg.min_context, hi + 1, (1,), generator=g))
        perm = torch.randperm(total, generator=g)
        ctx.append(user_examples(s_rows, p_rows, perm[:k], scores, pairs))
        tgt.append(user_examples(s_rows, p_rows, perm[k : k + cfg.max_target], scores, pairs))
    return head.context_batch(ctx), head.context_batch(tgt)


def episode_loss(
    head: LatentHead,
    context: ContextBatch,
    target: ContextBatch,
    kl_weight: float,
    n_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Negative ELBO per target example, averaged over the batch's users (a scalar)."""
    post = head.encode(context)
    z = post.sample(n_samples, generator)  # [S, U, d]
    nll, n_items = head.nll(target, z)
    return (nll + kl_weight * post.kl() / n_items.clamp(min=1)).mean()


def _score_scale(scores: ScoreSet) -> float:
    """Standard deviation of scores around each rater's own mean (the encoder's score unit)."""
    raters, inverse = scores.rater.unique(return_inverse=True)
    sums = torch.zeros(len(raters)).index_add_(0, inverse, scores.score.float())
    counts = torch.zeros(len(raters)).index_add_(0, inverse, torch.ones(len(inverse)))
    centred = scores.score.float() - (sums / counts)[inverse]
    sd = float(centred.std()) if len(centred) > 1 else 1.0
    return sd if sd > 1e-6 else 1.0


def fit_latent(
    head: LatentHead,
    scores: ScoreSet | None = None,
    pairs: PairSet | None = None,
    cfg: LatentTrainConfig | None = None,
) -> LatentHistory:
    """Train `head` in place on users' episodes (rater index = user); see the module docstring.

    A `val_users` fraction of users is held out; every `eval_every` steps their episode loss
    (fixed contexts and targets) decides early stopping, and the best weights are restored.
    """
    cfg = cfg or LatentTrainConfig()
    if not isinstance(head, LatentHead):
        raise UserError(f"fit_latent trains latent heads, got a {head.kind} head")
    if scores is None and pairs is None:
        raise UserError("fit_latent needs scores=ScoreSet(...), pairs=PairSet(...), or both")
    if not 1 <= cfg.min_context <= cfg.max_context or cfg.steps < 1 or cfg.users_per_batch < 1:
        raise UserError(
            f"bad latent training config: need 1 <= min_context ({cfg.min_context}) <= "
            f"max_context ({cfg.max_context}), steps >= 1 and users_per_batch >= 1"
        )
    for data, name in ((scores, "scores"), (pairs, "pairs")):
        if data is not None and data.features.shape[-1] != head.feature_dim:
            raise UserError(
                f"{name}: features are {data.features.shape[-1]}-dim but the latent head "
                f"expects {head.feature_dim}"
            )
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    users = group_by_user(scores, pairs, cfg.min_context + 2)
    if len(users.ids) < 2:
        raise UserError(
            f"fit_latent needs >= 2 users with >= {cfg.min_context + 2} examples each, "
            f"found {len(users.ids)}"
        )
    if scores is not None:
        head.score_scale.fill_(_score_scale(scores))
    head.to(cfg.device)
    order = torch.randperm(len(users.ids), generator=g).tolist()
    n_val = int(round(cfg.val_users * len(order))) if len(order) >= 10 else 0
    val, train = order[:n_val], order[n_val:]
    val_g = torch.Generator().manual_seed(cfg.seed + 1)
    # several fixed episodes per held-out user, so the early-stopping signal is not one draw
    val_batch = _episodes(head, users, val * 4, scores, pairs, cfg, val_g) if val else None

    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = LatentHistory()
    stopper, window = EarlyStopping(cfg.patience, min_delta=1e-5), []
    for step in tqdm(range(cfg.steps), desc="fit latent head", disable=not cfg.progress):
        head.train()
        pick = torch.randint(len(train), (min(cfg.users_per_batch, len(train)),), generator=g)
        ctx, tgt = _episodes(head, users, [train[i] for i in pick], scores, pairs, cfg, g)
        beta = cfg.kl_weight * min(1.0, (step + 1) / max(cfg.kl_anneal_steps, 1))
        loss = episode_loss(head, ctx, tgt, beta, cfg.n_z_samples, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append(loss.item())
        if (step + 1) % cfg.eval_every and step + 1 < cfg.steps:
            continue
        history.train_loss.append(float(np.mean(window)))
        window = []
        if val_batch is None or step + 1 < cfg.kl_anneal_steps:
            continue  # losses under a still-rising beta are not comparable
        head.eval()
        with torch.no_grad():
            v = episode_loss(
                head,
                *val_batch,
                cfg.kl_weight,
                16,
                torch.Generator().manual_seed(cfg.seed + 2),
            ).item()
        history.val_loss.append(v)
        if stopper.update(v, head):
            history.best_step = step
        elif stopper.exhausted:
            history.stopped_early = True
            break
    if not stopper.restore(head):
        history.best_step = step
    head.eval()
    return history
