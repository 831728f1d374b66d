"""`plural-diffusion serve --collect IMAGE_DIR --out RATINGS_DIR --rater NAME ...`: a local page
where each named rater scores images and compares pairs, for a team with no rating data yet.

Answers are appended to RATINGS_DIR/scores.csv (image, rater_id, score) and pairs.csv (image_a,
image_b, rater_id, winner = a / b / tie), the project's own tables, with image paths relative to
RATINGS_DIR, so `reward-models train data.path=RATINGS_DIR` reads them as they are. Each write
replaces the table atomically; rows already there (other raters', earlier sessions') are kept.

Each rater has a plan of their own (images and pairs drawn with a seed from their name) and
reaches it through their own link, /r/TOKEN, a random token kept in RATINGS_DIR/.rater-tokens.json
(readable by the owner only) so links survive a restart. Where a rater is in their plan is read
from the tables, so they can stop and come back. A page shows a rater their own progress only;
images are served by index into the list made at start-up, every file inside IMAGE_DIR.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from flask import Flask, abort, redirect, request, send_file, url_for

from plural_diffusion.web import list_images, page, parse_score, relative_name
from reward_models.data.tables import PAIR_COLUMNS, SCORE_COLUMNS
from reward_models.errors import UserError
from reward_models.io import atomic_path

TOKENS_NAME = ".rater-tokens.json"
RATER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
WINNERS = {"a": "a", "b": "b", "tie": "tie"}


@dataclass
class CollectConfig:
    images: str
    out: str
    raters: list[str] = field(default_factory=list)
    scores_per_rater: int = 20
    pairs_per_rater: int = 20
    score_range: tuple[float, float] = (0.0, 10.0)
    seed: int = 0


class Collector:
    """The raters' plans, tokens and the two tables on disk."""

    def __init__(self, cfg: CollectConfig):
        self.cfg = cfg
        bad = [r for r in cfg.raters if not RATER_ID.fullmatch(r)]
        if not cfg.raters or bad:
            raise UserError(
                f"rater names {bad or '(none)'}: name each rater with --rater NAME (letters, "
                "digits, '_', '.', '-'; at most 64 characters)"
            )
        if len(set(cfg.raters)) != len(cfg.raters):
            raise UserError("a rater is named twice; give each --rater once")
        if cfg.scores_per_rater < 0 or cfg.pairs_per_rater < 0:
            raise UserError("--scores-per-rater and --pairs-per-rater must be >= 0")
        self.images = list_images(cfg.images)
        if cfg.pairs_per_rater and len(self.images) < 2:
            raise UserError(f"{cfg.images}: pairs need at least 2 images")
        self.out = Path(cfg.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.names = [relative_name(p, self.out) for p in self.images]
        self.lock = threading.Lock()
        self.tables = {
            "scores": self._read("scores", SCORE_COLUMNS),
            "pairs": self._read("pairs", PAIR_COLUMNS),
        }
        self.tokens = self._tokens()
        self.rater_of = {t: r for r, t in self.tokens.items() if r in cfg.raters}
        self.plans = {r: self._plan(r) for r in cfg.raters}

    # ---- files -------------------------------------------------------------------------
    def path(self, kind: str) -> Path:
        return self.out / f"{kind}.csv"

    def _read(self, kind: str, columns: tuple[str, ...]) -> pd.DataFrame:
        if not self.path(kind).is_file():
            return pd.DataFrame(columns=list(columns))
        df = pd.read_csv(self.path(kind), dtype=str, keep_default_na=False)
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise UserError(
                f"{self.path(kind)}: not a {kind} table (no {', '.join(missing)} column); "
                "choose another --out folder"
            )
        return df

    def _tokens(self) -> dict[str, str]:
        path = self.out / TOKENS_NAME
        tokens = json.loads(path.read_text()) if path.is_file() else {}
        new = {r: secrets.token_urlsafe(16) for r in self.cfg.raters if r not in tokens}
        if new:
            tokens.update(new)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(tokens, indent=1) + "\n")
                os.chmod(tmp, 0o600)  # the links are the raters' only credential
        return tokens

    def _append(self, kind: str, row: dict) -> None:
        df = pd.concat([self.tables[kind], pd.DataFrame([row])], ignore_index=True)
        with atomic_path(self.path(kind)) as tmp:
            df.to_csv(tmp, index=False)
        self.tables[kind] = df

    # ---- plans -------------------------------------------------------------------------
    def _plan(self, rater: str) -> dict[str, list]:
        """The images this rater scores and the pairs they compare, fixed by seed and name: each
        image and each pair at most once (fewer than asked when the folder has too few)."""
        rng = random.Random(f"{self.cfg.seed}:{rater}")
        n = len(self.images)
        scores = rng.sample(range(n), min(n, self.cfg.scores_per_rater))
        wanted = min(n * (n - 1) // 2, self.cfg.pairs_per_rater)
        pairs: list[tuple[int, int]] = []
        seen: set[frozenset] = set()
        while len(pairs) < wanted:
            a, b = rng.sample(range(n), 2)
            if frozenset((a, b)) not in seen:
                seen.add(frozenset((a, b)))
                pairs.append((a, b))
        return {"scores": scores, "pairs": pairs}

    def done(self, rater: str) -> dict[str, int]:
        return {k: int((t["rater_id"] == rater).sum()) for k, t in self.tables.items()}

    def task(self, rater: str) -> tuple[str, int] | None:
        """The rater's next task: ("scores", n) or ("pairs", n), alternating; None when done."""
        done, plan = self.done(rater), self.plans[rater]
        left = [k for k in ("scores", "pairs") if done[k] < len(plan[k])]
        if not left:
            return None
        kind = min(left, key=lambda k: (done[k], k == "pairs"))
        return kind, done[kind]

    def rater(self, token: str) -> str:
        rater = self.rater_of.get(token)
        if rater is None:
            raise KeyError(token)
        return rater

    def answer(self, rater: str, form) -> str:
        """Append one answer; a message for the page, or a UserError (nothing written)."""
        with self.lock:
            task = self.task(rater)
            if task is None or form.get("task") != f"{task[0]}-{task[1]}":
                raise UserError(
                    "this form is out of date (it was already answered, or another tab moved "
                    "on); nothing from it was saved - answer the one below instead"
                )
            kind, n = task
            if kind == "scores":
                lo, hi = self.cfg.score_range
                score = parse_score(form.get("score"), lo, hi, "score")
                image = self.names[self.plans[rater]["scores"][n]]
                self._append("scores", {"image": image, "rater_id": rater, "score": f"{score:g}"})
            else:
                winner = WINNERS.get(str(form.get("winner", "")))
                if winner is None:
                    raise UserError("choose the left image, the right one, or 'no preference'")
                a, b = self.plans[rater]["pairs"][n]
                row = {"image_a": self.names[a], "image_b": self.names[b], "rater_id": rater}
                self._append("pairs", {**row, "winner": winner})
            return "saved"

    def links(self, base_url: str) -> dict[str, str]:
        return {r: f"{base_url}/r/{self.tokens[r]}" for r in self.cfg.raters}


PAGE = """
<h1>Hello {{ rater }}</h1>
{% if message %}<div class="message {{ kind }}" id="message">{{ message }}</div>{% endif %}
<p id="progress">{{ answered }} of {{ total }} answered. You can stop at any time and come back
to this link.</p>
{% if task is none %}<p id="finished">All done - thank you!</p>
{% elif task[0] == "scores" %}
<form method="post" action="{{ url_for('rater_answer', token=token) }}" id="score" novalidate><input type="hidden" name="task" value="{{ task_id }}">
<div class="card"><img src="{{ url_for('image', token=token, index=images[0]) }}" alt="image"></div>
<label>How much do you like this image? ({{ low }} = not at all, {{ high }} = very much)<br>
<input type="number" name="score" min="{{ low }}" max="{{ high }}" step="any" autofocus></label>
<button type="submit">Save</button></form>
{% else %}
<form method="post" action="{{ url_for('rater_answer', token=token) }}" id="pair"><input type="hidden" name="task" value="{{ task_id }}">
<p>Which of the two do you prefer?</p>
<div class="cards">
<div class="card"><img src="{{ url_for('image', token=token, index=images[0]) }}" alt="left">
<button type="submit" name="winner" value="a">the left one</button></div>
<div class="card"><img src="{{ url_for('image', token=token, index=images[1]) }}" alt="right">
<button type="submit" name="winner" value="b">the right one</button></div>
</div><button type="submit" name="winner" value="tie">no preference</button></form>
{% endif %}
"""


def create_app(collector: Collector) -> Flask:
    app = Flask("plural_diffusion.collect")
    lo, hi = collector.cfg.score_range

    def rater_or_404(token: str) -> str:
        try:
            return collector.rater(token)
        except KeyError:
            abort(404, "unknown link: ask whoever runs this page for yours")

    def show(token: str, message=None, kind="ok", status=200):
        rater = rater_or_404(token)
        with collector.lock:
            task, done = collector.task(rater), collector.done(rater)
        plan = collector.plans[rater]
        images = []
        if task is not None:
            item = plan[task[0]][task[1]]
            images = [item] if task[0] == "scores" else list(item)
        return page(
            f"Ratings from {rater}",
            PAGE,
            status,
            rater=rater,
            token=token,
            message=message,
            kind=kind,
            task=task,
            task_id=None if task is None else f"{task[0]}-{task[1]}",
            images=images,
            answered=sum(done.values()),
            total=len(plan["scores"]) + len(plan["pairs"]),
            low=f"{lo:g}",
            high=f"{hi:g}",
        )

    @app.get("/")
    def index():
        return page("Ratings", "<h1>Ratings</h1><p>Open the link you were given.</p>")

    @app.get("/r/<token>")
    def rater_page(token: str):
        return show(token, request.args.get("message"))

    @app.post("/r/<token>")
    def rater_answer(token: str):
        rater = rater_or_404(token)
        try:
            message = collector.answer(rater, request.form)
        except UserError as e:
            return show(token, str(e), "error", 400)
        return redirect(url_for("rater_page", token=token, message=message), 303)

    @app.get("/r/<token>/image/<int:index>")
    def image(token: str, index: int):
        rater_or_404(token)
        if not 0 <= index < len(collector.images):
            abort(404)
        return send_file(collector.images[index])

    return app
