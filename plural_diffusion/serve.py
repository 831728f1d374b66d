"""`plural-diffusion serve --checkpoint CK`: a local page where a new user rates a handful of
images chosen by the active query, sees what the project infers (the nearest taste clusters and
how sure that is) and gets images generated for that taste.

    rounds    each round asks `per_round` images, picked one after another by BALD over the
              taste posterior so far (`plural_diffusion.new_user`); a submitted round is saved
              at once to OUT/ratings.csv (image, score), the file `generate --ratings` reads
    taste     inferred exactly as `generate --ratings` infers it from that file
    generate  the policy generates for the taste in a background thread; the page polls
              /progress and shows the images as they are written to OUT/generated/NNN/

Every form carries the round it was made for (a random token, new each round and each start): a stale or replayed form (a second tab, the back
button, a double submit) is refused with a message and saves nothing. A restarted server reads
OUT/ratings.csv back, so nothing already rated is lost. Images are addressed by their index in
lists the server made, never by a path from the browser.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from flask import Flask, abort, jsonify, redirect, request, send_file, url_for

from plural_diffusion.generate import Taste, generate_images, write_outputs
from plural_diffusion.new_user import infer_taste, next_query
from plural_diffusion.policy import CheckpointInfo, SamplingOverrides, TastePolicy
from plural_diffusion.web import list_images, page, parse_score, relative_name
from reward_models.errors import UserError
from reward_models.io import atomic_path

RATINGS_NAME = "ratings.csv"


@dataclass
class ServeConfig:
    checkpoint: str
    out: str = "outputs/serve"
    rewards: str | None = None  # default: the reward run the checkpoint was trained with
    images: str | None = None  # images to rate; default: the reward run's training images
    base: str | None = None  # default: the checkpoint's base
    prompts: list[str] = field(default_factory=list)  # default: the checkpoint's first two
    seeds: int = 4  # images per prompt
    per_round: int = 4
    pool: int = 200  # candidate images drawn from `images`
    score_range: tuple[float, float] = (0.0, 10.0)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"  # the frozen models' dtype: bf16 or fp16 on a GPU


def load_taste_model(cfg: ServeConfig):
    """(checkpoint info, rewards) for a taste-conditioned checkpoint, or a one-line UserError."""
    from plural_diffusion.rewards import TasteRewards

    info = CheckpointInfo.read(cfg.checkpoint)
    if not info.conditioned:
        raise UserError(
            f"checkpoint {info.path} has no taste conditioner (a taste-blind policy) so it cannot "
            "generate for a new user's taste; serve a checkpoint trained with objective=matched"
        )
    run = cfg.rewards or info.config.get("rewards")
    if not run:
        raise UserError("the checkpoint names no reward run: pass --rewards RUN_DIR")
    if not (Path(run) / "rater").is_dir():
        raise UserError(
            f"{run}: no rater head in this reward run, so a new user's ratings cannot become a "
            "taste; pass --rewards with the run the policy was trained with"
        )
    return info, TasteRewards(str(run), device=cfg.device, space=info.taste_space)


def default_image_folder(rewards) -> Path:
    """Where the reward run's training images are: its data path (a folder or a table's)."""
    data = Path(rewards.run.cfg.data.path)
    root = rewards.run.cfg.data.image_root
    return Path(root) if root else (data if data.is_dir() else data.parent)


class RateSession:
    """One person's ratings, the current round's questions and the generation job."""

    def __init__(self, cfg: ServeConfig, rewards, policy=None):
        self.cfg, self.rewards, self.policy = cfg, rewards, policy
        self.out = Path(cfg.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        folder = Path(cfg.images) if cfg.images else default_image_folder(rewards)
        files = list_images(folder)
        g = torch.Generator().manual_seed(cfg.seed)
        pick = torch.randperm(len(files), generator=g)[: cfg.pool].sort().values.tolist()
        self.pool = [files[i] for i in pick]
        self.features = rewards.encoder.encode_images(self.pool, progress=False)  # [M, D]
        self.rated: list[tuple[Path, float]] = self._read_saved()
        self.round = ""  # the current round's token
        self.questions: list[int] = []
        self.taste = None
        self.job = {"id": 0, "state": "idle", "done": 0, "total": 0, "error": None, "files": []}
        self._update()

    # ---- ratings -----------------------------------------------------------------------
    @property
    def ratings_file(self) -> Path:
        return self.out / RATINGS_NAME

    def _read_saved(self) -> list[tuple[Path, float]]:
        """The ratings a previous session saved (kept, and counted in the taste)."""
        if not self.ratings_file.is_file():
            return []
        df = pd.read_csv(self.ratings_file, dtype={"image": str})
        ok = {"image", "score"} <= set(df.columns)
        scores = pd.to_numeric(df["score"], errors="coerce") if ok else None
        if scores is None or scores.isna().any() or df["image"].isna().any():
            raise UserError(
                f"{self.ratings_file}: not a ratings file of this page (image, score columns with "
                "numbers); move it away or choose another --out folder"
            )
        paths = [(self.out / name).resolve() for name in df["image"]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"{self.ratings_file}: rated image {missing[0]} is missing")
        return list(zip(paths, scores.astype(float).tolist()))

    def _save(self) -> None:
        rows = [{"image": relative_name(p, self.out), "score": s} for p, s in self.rated]
        with atomic_path(self.ratings_file) as tmp:
            pd.DataFrame(rows, columns=["image", "score"]).to_csv(tmp, index=False)

    def _rated_features(self) -> torch.Tensor:
        index = {p: i for i, p in enumerate(self.pool)}
        missing = [p for p, _ in self.rated if p not in index]
        extra = self.rewards.encoder.encode_images(missing, progress=False) if missing else None
        rows, k = [], 0
        for p, _ in self.rated:
            if p in index:
                rows.append(self.features[index[p]])
            else:
                rows.append(extra[k])
                k += 1
        return torch.stack(rows) if rows else self.features[:0]

    def _update(self) -> None:
        """Re-infer the taste and ask the next round's images (one by one, by BALD)."""
        feats = self._rated_features()
        scores = torch.tensor([s for _, s in self.rated], dtype=torch.float32)
        self.taste = infer_taste(self.rewards, feats, scores, seed=self.cfg.seed)
        asked = {p for p, _ in self.rated}
        left = [i for i, p in enumerate(self.pool) if p not in asked]
        picks: list[int] = []
        for _ in range(min(self.cfg.per_round, len(left))):
            ref = torch.cat([feats, self.features[picks]]) if picks else feats
            j = next_query(self.rewards, self.taste, self.features[left], ref, seed=self.cfg.seed)
            picks.append(left.pop(j))
        self.questions = picks
        self.round = secrets.token_urlsafe(8)

    def submit(self, form) -> str:
        """Record a round's scores (all or nothing); a message for the page, or a UserError."""
        lo, hi = self.cfg.score_range
        with self.lock:
            if form.get("round") != self.round:
                raise UserError(
                    "this form is out of date (it was already submitted, or another tab moved "
                    "on); nothing from it was saved - rate the images below instead"
                )
            scores = [
                parse_score(form.get(f"score_{i}"), lo, hi, f"image {n + 1}")
                for n, i in enumerate(self.questions)
            ]
            self.rated += [(self.pool[i], s) for i, s in zip(self.questions, scores)]
            self._save()
            self._update()
            return f"saved {len(scores)} ratings ({len(self.rated)} in all) to {self.ratings_file}"

    # ---- generation --------------------------------------------------------------------
    def start_generation(self, kind: str = "fitted") -> str:
        """Start generating for the fitted taste (what `generate --ratings` uses) or, with
        kind="cluster", for the most probable cluster's taste (one the policy was trained on)."""
        with self.lock:
            if kind not in ("fitted", "cluster"):
                raise UserError(f"unknown taste {kind[:20]!r}: choose fitted or cluster")
            if self.job["state"] == "running":
                raise UserError("images are already being generated; wait for them below")
            if len(self.rated) < 2:
                raise UserError("rate at least 2 images first: a taste needs two ratings")
            if kind == "cluster":
                k = int(self.taste.cluster_probability.argmax())
                name = self.rewards.cluster_names[k]
                z = self.rewards.cluster_tastes[k].detach().cpu()
                taste = Taste(f"cluster {name}", f"cluster:{name}", z)
            else:
                z = self.taste.z.clone()
                taste = Taste(f"you ({len(self.rated)} ratings)", "ratings", z)
            job_id = self.job["id"] + 1
            total = len(self.prompts) * self.cfg.seeds
            self.job = {
                "id": job_id,
                "state": "running",
                "done": 0,
                "total": total,
                "error": None,
                "files": [],
            }
        threading.Thread(target=self._generate, args=(job_id, taste), daemon=True).start()
        return f"generating {total} images for {taste.label}"

    @property
    def prompts(self) -> list[str]:
        """The prompts to generate for: the user's, else the checkpoint's first two."""
        trained = CheckpointInfo.read(self.cfg.checkpoint).config.get("prompts", [])
        return list(self.cfg.prompts) or trained[:2] or ["an image"]

    def _generate(self, job_id: int, taste: Taste) -> None:
        try:
            policy = self.policy
            settings = policy.settings(SamplingOverrides())
            seeds = list(range(self.cfg.seeds))
            parts = []
            for seed in seeds:  # one seed at a time, so the page can show progress
                parts.append(
                    generate_images(policy, self.prompts, [taste], [seed], settings, progress=False)
                )
                with self.lock:
                    self.job["done"] += len(self.prompts)
            images = torch.cat(parts, dim=2)  # [1, P, S, 3, H, W]
            folder = self.out / "generated" / f"{job_id:03d}"
            manifest = write_outputs(images, policy, self.prompts, [taste], seeds, settings, folder)
            files = [folder / f["file"] for p in manifest["prompts"] for f in p["images"]]
            with self.lock:
                self.job.update(state="done", files=files)
        except Exception as e:  # shown on the page; the server keeps running
            with self.lock:
                self.job.update(state="failed", error=f"{type(e).__name__}: {e}")


PAGE = """
<h1>Rate a few images, get images for your taste</h1>
{% if message %}<div class="message {{ kind }}" id="message">{{ message }}</div>{% endif %}
<h2>What your ratings say</h2>
{% if n_rated < 2 %}
<p id="taste">No taste yet: rate at least two images.</p>
{% else %}
<p id="taste">From your {{ n_rated }} ratings, your taste is nearest to
<b id="nearest">{{ clusters[0][0] }}</b> ({{ "%.0f" % (100 * clusters[0][1]) }}% sure).</p>
<table id="clusters">{% for name, p in clusters %}
<tr><td>{{ name }}</td><td><span class="bar" style="width: {{ (200 * p) | int }}px"></span>
{{ "%.0f" % (100 * p) }}%</td></tr>{% endfor %}</table>
<p class="muted">Share of the taste posterior nearest each cluster's taste; posterior sd
{{ "%.3f" % sd }} per taste dimension. Saved in {{ ratings_file }}.</p>
{% endif %}
<h2>Rate these ({{ low }} = dislike, {{ high }} = love)</h2>
{% if questions %}
<form method="post" action="{{ url_for('rate') }}" id="rate" novalidate>
<input type="hidden" name="round" value="{{ round }}">
<div class="cards">{% for i in questions %}
<div class="card"><img src="{{ url_for('candidate', index=i) }}" alt="image {{ loop.index }}">
<label>image {{ loop.index }}<br><input type="number" name="score_{{ i }}" min="{{ low }}"
 max="{{ high }}" step="any" required></label></div>{% endfor %}</div>
<button type="submit">Save my ratings</button>
</form>
{% else %}<p>Every candidate image is rated.</p>{% endif %}
<h2>Images for your taste</h2>
<form method="post" action="{{ url_for('generate') }}" id="generate">
<button type="submit" name="taste" value="fitted" {% if n_rated < 2 %}disabled{% endif %}>
Generate images for my taste</button>
<button type="submit" name="taste" value="cluster" {% if n_rated < 2 %}disabled{% endif %}>
Generate for my nearest cluster{% if n_rated >= 2 %} ({{ clusters[0][0] }}){% endif %}</button>
</form>
<p class="muted">Your own taste is fitted to your ratings; the nearest cluster's taste is one the
policy was trained on, often sharper when the page is sure of the cluster.</p>
<p><progress id="progress" max="1" value="0" hidden></progress> <span id="status"></span></p>
<div class="gallery" id="gallery"></div>
<script>
async function poll() {
  const r = await fetch("{{ url_for('progress') }}");
  const job = await r.json();
  const bar = document.getElementById("progress");
  const status = document.getElementById("status");
  if (job.state === "idle") return;
  bar.hidden = job.state !== "running"; bar.max = job.total; bar.value = job.done;
  if (job.state === "running") {
    status.textContent = `generating: ${job.done} of ${job.total} images`;
    setTimeout(poll, 400);
  } else if (job.state === "failed") {
    status.textContent = "generation failed: " + job.error;
  } else {
    status.textContent = `${job.images.length} images for your taste`;
    const gallery = document.getElementById("gallery");
    gallery.replaceChildren(...job.images.map((src, i) => {
      const img = document.createElement("img"); img.src = src; img.alt = "generated " + (i + 1);
      img.className = "generated"; return img; }));
  }
}
poll();
</script>
"""


def create_app(session: RateSession) -> Flask:
    app = Flask("plural_diffusion.serve")
    lo, hi = session.cfg.score_range

    def show(message=None, kind="ok", status=200):
        taste = session.taste
        clusters = taste.nearest_clusters(session.rewards.cluster_names)
        return page(
            "Rate and receive - plural-diffusion",
            PAGE,
            status,
            message=message,
            kind=kind,
            n_rated=len(session.rated),
            clusters=clusters,
            sd=float(taste.posterior.var.sqrt().mean()),
            questions=session.questions,
            round=session.round,
            low=f"{lo:g}",
            high=f"{hi:g}",
            ratings_file=session.ratings_file,
        )

    @app.get("/")
    def index():
        return show(request.args.get("message"))

    @app.post("/rate")
    def rate():
        try:
            message = session.submit(request.form)
        except UserError as e:
            return show(str(e), "error", 400)
        return redirect(url_for("index", message=message), 303)  # a reload cannot resubmit

    @app.post("/generate")
    def generate():
        try:
            message = session.start_generation(request.form.get("taste", "fitted"))
        except UserError as e:
            return show(str(e), "error", 409)
        return redirect(url_for("index", message=message), 303)

    @app.get("/progress")
    def progress():
        with session.lock:
            job = dict(session.job)
        images = [url_for("generated", job=job["id"], index=i) for i in range(len(job["files"]))]
        return jsonify(
            {k: job[k] for k in ("id", "state", "done", "total", "error")} | {"images": images}
        )

    @app.get("/candidate/<int:index>")
    def candidate(index: int):
        if not 0 <= index < len(session.pool):
            abort(404)
        return send_file(session.pool[index])

    @app.get("/generated/<int:job>/<int:index>")
    def generated(job: int, index: int):
        with session.lock:
            files = session.job["files"] if session.job["id"] == job else []
        if not 0 <= index < len(files):
            abort(404)
        return send_file(files[index])

    return app


def build(cfg: ServeConfig) -> tuple[Flask, RateSession]:
    """Load the checkpoint, its reward run and the policy; the app and its session."""
    if cfg.per_round < 1 or cfg.seeds < 1:
        raise UserError("--per-round and --seeds must be >= 1")
    info, rewards = load_taste_model(cfg)
    base = cfg.base or info.config.get("base")
    if not base:
        raise UserError("the checkpoint names no base model: pass --base DIR_OR_HUB_ID")
    policy = TastePolicy.from_pretrained(base, info.path, device=cfg.device, dtype=cfg.dtype)
    session = RateSession(cfg, rewards, policy)
    return create_app(session), session
