"""A new user's taste from a few of their ratings, without retraining: MAP under the frozen head.

The rater head was trained with ratings modelled as

    rating = b_u + s_u * r(x, z_u) + noise,      noise ~ N(0, noise_sd^2)

(`RaterHead.predict_rating`: a taste z_u and a calibration b_u, s_u per rater). For a new user
u the head stays frozen and only (z, b, log s) are fitted to their scores, under priors fitted
to the raters the head already knows:

    z      ~ N(mean, Sigma)     over `head.rater_tastes()` (Ledoit-Wolf shrunk covariance)
    b      ~ N(., .)            over the raters' offsets
    log s  ~ N(., .)            over the raters' log-scales

    minimise  sum_i (y_i - b - s r(x_i, z))^2 / (2 noise_sd^2) + the three prior terms

The result lives in the head's own taste space, so anything trained on that space (the taste
clusters, a taste-conditioned diffusion policy) can use it directly. The posterior over z can be
multimodal (a few dark images fit "dark lover" and "dislikes bright" alike), so the fit starts
from the prior mean and from every extra start given (e.g. the cluster centroids) and keeps the
best. Laplace's approximation at the optimum gives the posterior sd of each taste dimension.

    taste = taste_from_ratings(load_run("runs/rewards"), "my_ratings.csv")
    taste.z                                                   # [d], feed it to the policy
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from reward_models.errors import UserError
from reward_models.heads import RaterHead

MIN_RATINGS = 2


@dataclass
class PersonalizeConfig:
    # sd of a score around b + s * r(x, z), in the raters' score units. The toy world's raters
    # have sd 0.8 plus rounding on a 0-10 scale; a larger value trusts the prior more.
    noise_sd: float = 1.0
    max_iter: int = 200  # L-BFGS iterations per start
    min_scale_sd: float = 0.05  # floor on the calibration priors' sds (tens of raters can agree)


@dataclass
class TastePrior:
    """Gaussian priors over a new rater's taste and calibration, from the head's known raters."""

    mean: torch.Tensor  # [d]
    precision: torch.Tensor  # [d, d], inverse of the shrunk covariance
    offset_mean: float
    offset_sd: float
    log_scale_mean: float
    log_scale_sd: float

    @classmethod
    def from_head(cls, head: RaterHead, min_sd: float = 0.05) -> TastePrior:
        tastes = head.rater_tastes().double().cpu()  # [R, d]
        if tastes.shape[0] < 2:
            raise UserError(
                f"a taste prior needs at least 2 known raters; this head knows {tastes.shape[0]}"
            )
        # Tens of raters in d dims: the sample covariance is noisy or singular; Ledoit-Wolf
        # shrinks it toward a scaled identity by the amount that minimises the expected error.
        cov = LedoitWolf().fit(tastes.numpy()).covariance_
        offset = head.rater_offset.detach().double().cpu()
        log_scale = head.rater_log_scale.detach().double().cpu()
        return cls(
            mean=tastes.mean(dim=0).float(),
            precision=torch.from_numpy(np.linalg.inv(cov)).float(),
            offset_mean=float(offset.mean()),
            offset_sd=max(float(offset.std()), min_sd),
            log_scale_mean=float(log_scale.mean()),
            log_scale_sd=max(float(log_scale.std()), min_sd),
        )


@dataclass
class FewShotTaste:
    """A new user's MAP taste and calibration."""

    z: torch.Tensor  # [d] in the head's taste space
    z_sd: torch.Tensor  # [d] Laplace posterior sd of each taste dimension
    offset: float  # b: the user's harsh/generous offset, score units
    scale: float  # s > 0
    n_ratings: int
    neg_log_posterior: float  # at the optimum, up to a constant

    def predict_rating(self, head: RaterHead, features: torch.Tensor) -> torch.Tensor:
        """The score this user would give images with features [B, D], [B]."""
        z = self.z.to(features.device).expand(features.shape[0], -1)
        return self.offset + self.scale * head.score(features, z)


def _objective(head, features, scores, prior, noise_sd):
    """Negative log posterior of the packed parameters [d + 2] = (z, b, log s)."""
    d = head.taste_dim

    def f(params: torch.Tensor) -> torch.Tensor:
        z, offset, log_scale = params[:d], params[d], params[d + 1]
        pred = offset + log_scale.exp() * head.score(features, z.expand(features.shape[0], -1))
        fit = ((scores - pred) ** 2).sum() / (2 * noise_sd**2)
        dz = z - prior.mean
        prior_z = 0.5 * dz @ prior.precision @ dz
        prior_b = 0.5 * ((offset - prior.offset_mean) / prior.offset_sd) ** 2
        prior_s = 0.5 * ((log_scale - prior.log_scale_mean) / prior.log_scale_sd) ** 2
        return fit + prior_z + prior_b + prior_s

    return f


@contextlib.contextmanager
def _frozen(head: RaterHead):
    """The head in eval mode with no trainable parameters; its state restored afterwards."""
    was_training, flags = head.training, [p.requires_grad for p in head.parameters()]
    head.eval().requires_grad_(False)
    try:
        yield head
    finally:
        head.train(was_training)
        for p, flag in zip(head.parameters(), flags):
            p.requires_grad_(flag)


def _fit(head, features, scores, prior, cfg, starts):
    """(packed MAP parameters [d + 2], negative log posterior, Laplace sd of z [d])."""
    d = head.taste_dim
    prior = prior or TastePrior.from_head(head, cfg.min_scale_sd)
    device = head.null_taste.device
    prior = dataclasses.replace(
        prior, mean=prior.mean.to(device), precision=prior.precision.to(device)
    )
    features, scores = features.float().to(device), scores.to(device)
    objective = _objective(head, features, scores, prior, cfg.noise_sd)

    initial = [prior.mean] + ([] if starts is None else list(starts.float().to(device)))
    best, best_loss = None, math.inf
    for z0 in initial:
        calibration = torch.tensor([prior.offset_mean, prior.log_scale_mean], device=device)
        params = torch.cat([z0, calibration])
        params = params.clone().requires_grad_(True)
        # L-BFGS: a (d + 2)-dim smooth problem, solved to convergence in tens of iterations
        optimizer = torch.optim.LBFGS(
            [params], max_iter=cfg.max_iter, line_search_fn="strong_wolfe"
        )

        def closure(params=params, optimizer=optimizer):
            optimizer.zero_grad()
            loss = objective(params)
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            loss = float(objective(params))
        if math.isfinite(loss) and loss < best_loss:
            best, best_loss = params.detach().clone(), loss
    if best is None:
        raise UserError("the taste fit diverged from every start; check the scores' scale")

    hessian = torch.autograd.functional.hessian(objective, best)  # [d + 2, d + 2]
    try:
        cov = torch.linalg.inv(hessian.double())
        z_sd = cov.diagonal()[:d].clamp(min=0).sqrt().float()
    except RuntimeError:  # singular Hessian: report the dimensions as unknown
        z_sd = torch.full((d,), float("nan"))
    return best, best_loss, z_sd


def fit_taste(
    head: RaterHead,
    features: torch.Tensor,
    scores: torch.Tensor,
    prior: TastePrior | None = None,
    cfg: PersonalizeConfig | None = None,
    starts: torch.Tensor | None = None,
) -> FewShotTaste:
    """MAP taste of one new user from their scores of a few images.

    features: [N, D] L2-normalised CLIP features of the rated images (the head's CLIP model).
    scores: [N] the user's scores, on the scale the head's raters used.
    starts: optional [M, d] extra starting tastes (e.g. cluster centroids); the prior mean is
        always one. The best optimum over the starts is returned.
    """
    cfg = cfg or PersonalizeConfig()
    if not isinstance(head, RaterHead):
        raise UserError(f"few-shot tastes need a rater head, got a {head.kind} head")
    head.check_features(features)
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    if scores.shape[0] != features.shape[0]:
        raise UserError(f"{features.shape[0]} feature rows for {scores.shape[0]} scores")
    if scores.shape[0] < MIN_RATINGS:
        raise UserError(f"a taste needs at least {MIN_RATINGS} ratings, got {scores.shape[0]}")
    if not torch.isfinite(scores).all():
        raise UserError("scores contain NaN or inf; fix or drop those ratings")
    if cfg.noise_sd <= 0:
        raise UserError(f"noise_sd={cfg.noise_sd}: must be > 0")
    d = head.taste_dim
    if starts is not None and (starts.ndim != 2 or starts.shape[1] != d):
        raise UserError(f"starting tastes must be [M, {d}], got {tuple(starts.shape)}")

    with _frozen(head):  # no dropout or null-taste draws; only (z, b, log s) move
        best, best_loss, z_sd = _fit(head, features, scores, prior, cfg, starts)
    return FewShotTaste(
        z=best[:d],
        z_sd=z_sd,
        offset=float(best[d]),
        scale=float(best[d + 1].exp()),
        n_ratings=int(scores.shape[0]),
        neg_log_posterior=best_loss,
    )


def read_user_ratings(
    path: str | Path, score_range: tuple[float, float] | None = None
) -> tuple[list[Path], torch.Tensor]:
    """One user's ratings from a CSV / JSONL / Parquet table with columns `image` and `score`.

    Image paths are relative to the table's folder (or absolute). A `rater_id` column is
    optional and, if present, must name one rater. Returns image files and scores [N].
    """
    from reward_models.data.validate import build_score_table, read_table, require_columns

    path = Path(path)
    df = read_table(path, str_columns=("image", "rater_id"))
    require_columns(df, ("image", "score"), str(path), "ratings")
    if "rater_id" in df.columns:
        raters = sorted({str(r) for r in df["rater_id"].dropna()})
        if len(raters) > 1:
            raise UserError(
                f"{path}: ratings of {len(raters)} raters ({', '.join(raters[:3])}, ...); "
                "give one user's ratings per file"
            )
    df["rater_id"] = "user"
    lo, hi = score_range if score_range is not None else (-math.inf, math.inf)
    table, _ = build_score_table(df, path.parent, score_range=(lo, hi), on_error="raise")
    if len(table) < MIN_RATINGS:
        raise UserError(f"{path}: {len(table)} rating(s); a taste needs at least {MIN_RATINGS}")
    images = [table.image_path(name) for name in table.df["image"]]
    return images, torch.tensor(table.scores, dtype=torch.float32)


def taste_from_ratings(
    run,
    path: str | Path,
    encoder=None,
    cfg: PersonalizeConfig | None = None,
) -> FewShotTaste:
    """A new user's taste from their ratings file, for a trained reward run (`load_run`).

    The images are encoded with `encoder` (a `ClipEncoder`; default: the run's CLIP model), and
    the fit starts from the prior mean and from every taste cluster's centroid.
    """
    from reward_models.features import load_clip

    images, scores = read_user_ratings(path)
    if encoder is None:
        encoder = load_clip(run.cfg.clip.model, run.cfg.clip.pretrained, device="cpu")
    if encoder.dim != run.rater.feature_dim:
        raise UserError(
            f"the rater head takes {run.rater.feature_dim}-dim features but the CLIP model gives "
            f"{encoder.dim}; encode with the run's CLIP model ({run.cfg.clip.model})"
        )
    features = encoder.encode_images(images, progress=False)
    device = run.rater.null_taste.device
    return fit_taste(
        run.rater, features.to(device), scores, cfg=cfg, starts=run.clusters.centroids.to(device)
    )


def latent_taste_from_ratings(run, path: str | Path, encoder):
    """A new user's taste posterior (mean, var [1, d]) from their ratings file under the run's
    latent head: one pass of its encoder, no fitting (for policies trained on latent tastes)."""
    from reward_models.research.latent import Context

    if run.latent is None:
        raise UserError("this reward run has no latent head; retrain it with latent.enabled=true")
    images, scores = read_user_ratings(path)
    features = encoder.encode_images(images, progress=False)
    return run.latent.infer(Context(features=features, scores=scores.float()))
