"""A self-contained HTML report of an evaluation: one file, no server, nothing fetched.

Every figure is drawn with matplotlib and embedded as a base64 PNG data URI; styles are inline.
The page leads with the question the project asks (does the taste-matched policy serve each
cluster better than the policy trained on the mean reward?) and then shows the evidence:

    headline cards per cluster, matched vs mean side by side on the same seeds
    summary table               gold utility (or learned reward) per cluster, worst, Vendi
    utility per cluster         grouped bars, one colour per policy
    win rates                   per cluster, against the baseline on the same prompt and seed
    cross-taste matrix          rows generated-for, columns scored-by
    diversity                   Vendi and CLIP distance, across all images and within a taste
    over-optimisation           proxy reward vs gold utility across training checkpoints
    images                      a grid per prompt: every policy and taste, columns seeds
    reward heads                held-out pairwise accuracy of the mean and rater heads

    write_report("outputs/report.html", metrics, images)     # metrics from evaluate_policies
"""

from __future__ import annotations

import base64
import datetime
import html
from pathlib import Path

from plural_diffusion.visualize import (
    NO_TASTE,
    fig_cluster_bars,
    fig_cross_taste,
    fig_diversity,
    fig_gold_vs_diversity,
    fig_overoptimisation,
    fig_win_rates,
    grid_png,
    policy_colours,
)
from reward_models.io import atomic_path

CSS = """
:root { --ink:#111827; --muted:#6b7280; --line:#e5e7eb; --bg:#f9fafb; --accent:#2563eb; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 32px 24px 64px; }
header .kicker { color:var(--muted); text-transform:uppercase; letter-spacing:.08em; font-size:12px; margin:0; }
h1 { font-size: 32px; margin: 4px 0 8px; }
h2 { font-size: 21px; margin: 40px 0 6px; padding-top: 8px; border-top: 1px solid var(--line); }
.lede { font-size: 17px; max-width: 820px; }
.caption, figcaption { color: var(--muted); font-size: 13.5px; max-width: 860px; margin: 4px 0 12px; }
.cards { display:grid; grid-template-columns: repeat(auto-fit, minmax(230px, 1fr)); gap: 14px; margin: 20px 0; }
.card { background:#fff; border:1px solid var(--line); border-radius:10px; padding:14px 16px; }
.card h3 { margin:0; font-size:15px; } .card .share { color:var(--muted); font-weight:normal; }
.card .big { font-size: 28px; font-weight: 650; margin: 6px 0 0; }
.card .vs { color: var(--muted); font-size: 13.5px; }
.up { color:#047857; } .down { color:#b91c1c; }
figure { margin: 8px 0 18px; } figure img { max-width: 100%; height: auto; background:#fff;
  border:1px solid var(--line); border-radius: 8px; padding: 6px; }
table { border-collapse: collapse; background:#fff; margin: 8px 0 6px; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 5px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f4f6; font-weight: 600; }
td.best { font-weight: 700; } td.text, th.text { text-align: left; }
.swatch { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:6px; }
.grids { display:grid; grid-template-columns: 1fr; gap: 6px; }
footer { color: var(--muted); font-size: 13px; margin-top: 48px; border-top:1px solid var(--line); padding-top: 12px; }
code { background:#eef2ff; padding: 1px 4px; border-radius: 4px; }
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _figure(png: bytes, alt: str, caption: str) -> str:
    return f"<figure>{_img(png, alt)}<figcaption>{caption}</figcaption></figure>"


def _e(text) -> str:
    return html.escape(str(text))


def _fmt(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}"


# --------------------------------------------------------------------------------- sections
def _table(header: list[str], rows: list[list[str]], classes: list[list[str]] | None = None) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            cls = classes[i][j] if classes else ""
            cells.append(f'<td class="{cls}">{cell}</td>' if cls else f"<td>{cell}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _utility_key(metrics: dict) -> tuple[str, str, str]:
    """(per-cluster key, worst key, words) for gold where every policy has it, else learned."""
    if all("gold_per_cluster" in m for m in metrics["policies"].values()):
        return "gold_per_cluster", "worst_cluster_gold", "gold utility"
    return "reward_per_cluster", "worst_cluster_reward", "learned reward"


def _headline(metrics: dict) -> str:
    names, shares = metrics["clusters"]["names"], metrics["clusters"]["shares"]
    head = metrics["headline"]
    policy, baseline = head["policy"], head["baseline"]
    key, worst, words = _utility_key(metrics)
    p, b = metrics["policies"][policy], metrics["policies"][baseline]
    kind = "gold" if key == "gold_per_cluster" else "learned"
    better = [n for n in names if p[key][n] > b[key][n]]
    asked = "Asked for each cluster's taste, " if p["tastes"] != [NO_TASTE] else ""
    sentence = (
        f"{asked}<b>{_e(policy)}</b> scores a higher {words} than <b>{_e(baseline)}</b> for "
        f"{len(better)} of {len(names)} clusters, and its worst-off cluster gets "
        f"<b>{_fmt(p[worst])}</b> where {_e(baseline)}'s gets {_fmt(b[worst])}."
    )
    cards = []
    for n, s in zip(names, shares):
        delta = p[key][n] - b[key][n]
        arrow = "up" if delta > 0 else "down"
        win = p.get("win_rate", {}).get(kind, {}).get(n)
        win_text = f"<br>wins on {win:.0%} of prompt/seed pairs" if win is not None else ""
        cards.append(
            f'<div class="card"><h3>{_e(n)} <span class="share">· {s:.0%} of raters</span></h3>'
            f'<p class="big">{_fmt(p[key][n])}</p>'
            f'<p class="vs">{_e(policy)} vs {_e(baseline)} {_fmt(b[key][n])} '
            f'<span class="{arrow}">({delta:+.3f})</span>{win_text}</p></div>'
        )
    return f'<p class="lede">{sentence}</p><section class="cards">{"".join(cards)}</section>'


def _policy_rows(images: dict, policies: list[str], clusters: list[str], start: int, n: int):
    """Grid rows of `policies` (in order): a taste-blind policy once, a taste-conditioned one
    once per cluster; each row the images of one prompt (rows start..start + n)."""
    rows, labels = [], []
    for who in policies:
        per_taste = images[who]
        for taste in (
            [NO_TASTE] if NO_TASTE in per_taste else [c for c in clusters if c in per_taste]
        ):
            rows.append(per_taste[taste][start : start + n])
            labels.append(f"{who} (taste-blind)" if taste == NO_TASTE else f"{who} → {taste}")
    return rows, labels


def _headline_images(metrics: dict, images: dict, seeds: list[int]) -> str:
    head = metrics["headline"]
    policy, baseline = head["policy"], head["baseline"]
    if policy not in images or baseline not in images or policy == baseline:
        return ""
    rows, labels = _policy_rows(
        images, [baseline, policy], metrics["clusters"]["names"], 0, len(seeds)
    )
    prompt = metrics.get("eval", {}).get("prompts", ["?"])[0]
    png = grid_png(rows, labels, seeds, f"'{prompt}': same seeds in every column")
    return _figure(
        png,
        f"{policy} and {baseline} images per cluster",
        f"The <b>{_e(baseline)}</b> policy's images and the <b>{_e(policy)}</b> policy's images for "
        "each cluster, from the same prompt and the same noise (same column = same seed): only the "
        "policy and the taste it was asked for differ.",
    )


def _lottery_words(name: str, m: dict) -> str:
    """A caption's sentence on how a lottery policy makes its images, or nothing."""
    if "lottery" not in m:
        return ""
    shares = ", ".join(f"{_e(n)} {s:.0%}" for n, s in m["lottery"]["shares"].items())
    return (
        f" {_e(name)} is taste-blind: each of its images is {_e(m['lottery']['of'])}'s image for "
        f"a cluster drawn with the shares ({shares}) that raise the worst-off cluster's place in "
        "its own range furthest, judged by the learned heads."
    )


def _experts_words(name: str, m: dict) -> str:
    """A caption's sentence on where a policy's taste experts came from, or nothing."""
    if not m.get("experts_from"):
        return ""
    sources = ", ".join(f"{_e(t)} {_e(c)}" for t, c in m["experts_from"].items())
    return (
        f" Each taste's expert in {_e(name)} comes from the checkpoint where that taste's own head "
        f"scored its held-out images best ({sources}); the shared weights are the last epoch's."
    )


def _summary(metrics: dict) -> str:
    names, shares = metrics["clusters"]["names"], metrics["clusters"]["shares"]
    key, worst, words = _utility_key(metrics)
    colours = policy_colours(list(metrics["policies"]))
    header = (
        ["policy"]
        + [f"{_e(n)} ({s:.0%})" for n, s in zip(names, shares)]
        + ["worst cluster", "Vendi (all)"]
    )
    policies = list(metrics["policies"])
    best = {n: max(metrics["policies"][p][key][n] for p in policies) for n in names}
    best_worst = max(metrics["policies"][p][worst] for p in policies)
    rows, classes = [], []
    for p in policies:
        m = metrics["policies"][p]
        rows.append(
            [f'<span class="swatch" style="background:{colours[p]}"></span>{_e(p)}']
            + [_fmt(m[key][n]) for n in names]
            + [_fmt(m[worst]), f"{m['vendi']:.2f}"]
        )
        classes.append(
            [""]
            + ["best" if m[key][n] == best[n] else "" for n in names]
            + ["best" if m[worst] == best_worst else "", ""]
        )
    caption = (
        f"Mean {words} of the images each policy made for each cluster (a taste-blind policy's "
        "images are the same for every cluster). Bold: the best policy per column. "
        + (
            "Gold utility is the toy world's ground truth, in (0, 1]; training only saw the "
            "learned heads."
            if key == "gold_per_cluster"
            else "No gold utilities are known here, "
            "so these are the learned heads' scores, the proxy the policies were trained on."
        )
        + "".join(_lottery_words(p, metrics["policies"][p]) for p in policies)
        + "".join(_experts_words(p, metrics["policies"][p]) for p in policies)
    )
    return f"<h2 id='summary'>Summary</h2>{_table(header, rows, classes)}<p class='caption'>{caption}</p>"


def _cross_taste(metrics: dict) -> str:
    names = metrics["clusters"]["names"]
    out = []
    for p, m in metrics["policies"].items():
        matrix_key = "cross_taste_gold" if "cross_taste_gold" in m else "cross_taste_reward"
        if matrix_key not in m:
            continue
        label = "gold utility" if matrix_key == "cross_taste_gold" else "learned reward"
        png = fig_cross_taste(m[matrix_key], names, label)
        dominance = (
            metrics.get("cross_taste_diagonal_dominance")
            if p == metrics.get("cross_taste_policy")
            else None
        )
        verdict = ""
        if dominance is not None:
            won = sum(dominance["by_column"])
            verdict = (
                f" In {won} of {len(names)} columns the images made for that cluster are the "
                "ones it likes best (diagonal dominance)."
            )
        out.append(
            _figure(
                png,
                f"cross-taste matrix of {p}",
                f"<b>{_e(p)}</b>: {label} of the images generated for each cluster (rows) as judged by "
                f"every cluster (columns). A policy that listens to the taste it is asked for is bright "
                f"on the diagonal.{verdict}",
            )
        )
    if not out:
        return ""
    return "<h2 id='cross-taste'>Who is each image for? The cross-taste matrix</h2>" + "".join(out)


def _win_rates(metrics: dict) -> str:
    baseline = metrics["headline"]["baseline"]
    others = [p for p in metrics["policies"] if p != baseline]
    if not others:
        return ""
    kind = (
        "gold"
        if all("gold" in metrics["policies"][p].get("win_rate", {}) for p in others)
        else "learned"
    )
    png = fig_win_rates(metrics, kind)
    names = metrics["clusters"]["names"]
    rows = [
        [_e(p)] + [_fmt(metrics["policies"][p]["win_rate"][kind][n], 2) for n in names]
        for p in others
    ]
    if kind == "gold":  # the same comparison by the learned head, the proxy trained on
        rows += [
            [f"{_e(p)} <small>(learned head)</small>"]
            + [_fmt(metrics["policies"][p]["win_rate"]["learned"][n], 2) for n in names]
            for p in others
        ]
    table = _table(["policy"] + [_e(n) for n in names], rows)
    return (
        f"<h2 id='win-rates'>Win rate against {_e(baseline)}, per cluster</h2>"
        + _figure(
            png,
            "win rates",
            (
                f"For each cluster k and each prompt and seed: does the policy's image for k have a "
                f"higher {kind} utility for k than the <b>{_e(baseline)}</b> policy's image from the same "
                "prompt and noise? Differences under 0.005 count as ties, a tie as one half; 0.5 (dashed) "
                "is no better than the baseline."
            ),
        )
        + table
    )


def _diversity(metrics: dict) -> str:
    png = fig_diversity(metrics)
    rows, classes = [], []
    for p, m in metrics["policies"].items():
        within = m["vendi_within_taste"]
        dist = m.get("mean_pairwise_distance_within_taste", {})
        for t, v in within.items():
            label = "all clusters (taste-blind)" if t == NO_TASTE else t
            rows.append([_e(p), _e(label), f"{v:.2f}", f"{dist.get(t, float('nan')):.3f}"])
            classes.append(["", "text", "", ""])
    header = ["policy", "asked for", "Vendi within taste", "CLIP distance within taste"]
    table = _table(header, rows, classes)
    return (
        "<h2 id='diversity'>Diversity</h2>"
        + _figure(
            png,
            "diversity",
            (
                "Across all of a policy's images: the Vendi score (1 = every image alike; N = all "
                "distinct) and the mean pairwise cosine distance of their CLIP features. Collapse to one "
                "look shows as a Vendi near 1. The table gives the same within each taste."
            ),
        )
        + table
    )


def _overoptimisation(metrics: dict) -> str:
    curves = metrics.get("overoptimisation") or {}
    if not curves:
        return ""
    names = metrics["clusters"]["names"]
    out = ["<h2 id='over-optimisation'>Over-optimisation: proxy reward vs gold utility</h2>"]
    for policy, curve in curves.items():
        png = fig_overoptimisation(curve, names, policy)
        gold = "gold_per_cluster" in curve
        out.append(
            _figure(
                png,
                f"over-optimisation curve of {policy}",
                (
                    f"<b>{_e(policy)}</b> at each saved training checkpoint (epoch 0 = the base model), "
                    f"{curve['n_seeds']} seed(s) per prompt and taste: the learned head's reward it was "
                    "trained on (top)"
                    + (
                        " and the gold utility it never saw (bottom). Where the proxy "
                        "keeps rising while gold stalls or falls, the policy is exploiting the head rather "
                        "than pleasing the cluster."
                        if gold
                        else "."
                    )
                ),
            )
        )
        if gold and curve.get("vendi_within_taste"):
            out.append(
                _figure(
                    fig_gold_vs_diversity(curve, names, policy),
                    f"gold vs diversity of {policy}",
                    f"<b>{_e(policy)}</b>: the gold utility it reaches (mean over clusters) against "
                    "how many distinct looks each taste gets (Vendi score of the CLIP features "
                    "within a taste, mean over tastes; 1 = one look), at each checkpoint. Training "
                    "moves right; the further it drops, the more of the base model's variety "
                    "the reward traded away.",
                )
            )
    return "".join(out)


def _image_grids(metrics: dict, images: dict, seeds: list[int], prompts: list[str]) -> str:
    if not images:
        return ""
    out = ["<h2 id='images'>Images: every policy, every taste, the same seeds</h2>"]
    clusters = metrics["clusters"]["names"]
    for p, prompt in enumerate(prompts):
        rows, labels = _policy_rows(images, list(images), clusters, p * len(seeds), len(seeds))
        png = grid_png(rows, labels, seeds, f"'{prompt}'")
        out.append(
            _figure(
                png,
                f"images for '{prompt}'",
                (
                    "Rows: each policy, once per taste it was asked for (a taste-blind policy once); "
                    "columns: seeds, the same initial noise for every row."
                ),
            )
        )
    return "".join(out)


def _reward_heads(metrics: dict) -> str:
    heads = metrics.get("reward_heads")
    if not heads:
        return ""
    groups = sorted({g for per in heads.values() for g in per})
    rows, classes = [], []
    best = {g: max(per.get(g, float("-inf")) for per in heads.values()) for g in groups}
    for head, per in heads.items():
        rows.append([_e(head)] + [_fmt(per[g]) if g in per else "–" for g in groups])
        classes.append([""] + ["best" if per.get(g) == best[g] else "" for g in groups])
    return (
        "<h2 id='reward-heads'>Reward heads: held-out pairwise accuracy per cluster</h2>"
        + _table(["head"] + [_e(g) for g in groups], rows, classes)
        + "<p class='caption'>How often each head orders two held-out images the way a rater of "
        "that cluster scored them (0.5 = chance). The mean head fits the majority; the rater head, "
        "conditioned on the rater's taste, is what the matched policy is rewarded by.</p>"
    )


def build_report(metrics: dict, images: dict | None = None, title: str | None = None) -> str:
    """The report page as one HTML string (see the module docstring); `images` maps policy ->
    taste -> [P * S, 3, H, W] (prompt-major), as `evaluate_policies` returns them."""
    images = images or {}
    ev = metrics.get("eval", {})
    prompts = ev.get("prompts", ["?"])
    seeds = ev.get("seeds") or list(range(8))
    if "headline" not in metrics:
        policies = list(metrics["policies"])
        baseline = "mean" if "mean" in policies else policies[0]
        policy = "matched" if "matched" in policies else policies[-1]
        metrics = {**metrics, "headline": {"policy": policy, "baseline": baseline}}
    head = metrics["headline"]
    h1 = f"{head['policy'].capitalize()} vs {head['baseline']}, per cluster"
    title = title or f"plural-diffusion report: {h1}"
    settings = (
        f"{len(prompts)} prompt(s): "
        + ", ".join(f"<code>{_e(p)}</code>" for p in prompts)
        + f"; seeds {_e(', '.join(map(str, seeds)))}; {ev.get('steps', '?')} DDIM steps, "
        f"guidance {ev.get('guidance', '?')}, eta {ev.get('eta', '?')}."
    )
    key, _, words = _utility_key(metrics)
    ylabel = "gold utility (0..1)" if key == "gold_per_cluster" else "learned reward"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<link rel='icon' href='data:,'>",  # no favicon request for a file:// page
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>",
        f"<header><p class='kicker'>plural-diffusion · evaluation report</p><h1>{_e(h1)}</h1></header>",
        _headline(metrics),
        _headline_images(metrics, images, seeds),
        _summary(metrics),
        f"<h2 id='per-cluster'>{words.capitalize()} per cluster</h2>",
        _figure(
            fig_cluster_bars(metrics, key, ylabel),
            f"{words} per cluster",
            f"Mean {words} of each policy's images, one group of bars per taste cluster. A policy "
            "fit to the mean reward tends to serve the majority; one that serves plural taste "
            "keeps every group high.",
        ),
        _win_rates(metrics),
        _cross_taste(metrics),
        _diversity(metrics),
        _overoptimisation(metrics),
        _image_grids(metrics, images, seeds, prompts),
        _reward_heads(metrics),
        f"<footer>{settings} Generated {datetime.datetime.now():%Y-%m-%d %H:%M}. "
        "Numbers are in metrics.json beside this file.</footer>",
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p)


def write_report(
    path: str | Path, metrics: dict, images: dict | None = None, title: str | None = None
) -> Path:
    """Write the report page to `path`, atomically; returns the path."""
    path = Path(path)
    page = build_report(metrics, images, title)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def summary_table(metrics: dict) -> str:
    """The per-cluster table for a terminal: gold utility (or learned reward where gold is
    unknown), worst cluster, Vendi, and win rates against the baseline."""
    names = metrics["clusters"]["names"]
    shares = metrics["clusters"]["shares"]
    gold = all("gold_per_cluster" in m for m in metrics["policies"].values())
    key, worst = (
        ("gold_per_cluster", "worst_cluster_gold")
        if gold
        else ("reward_per_cluster", "worst_cluster_reward")
    )
    title = "gold utility" if gold else "learned reward"
    head = f"{title:<14}" + "".join(f"{n} ({s:.0%})".rjust(14) for n, s in zip(names, shares))
    lines = [head + f"{'worst':>9}{'vendi':>8}"]
    for policy, m in metrics["policies"].items():
        row = "".join(f"{m[key][n]:>14.3f}" for n in names)
        lines.append(f"{policy:<14}{row}{m[worst]:>9.3f}{m['vendi']:>8.2f}")
    baseline = metrics.get("headline", {}).get("baseline")
    if baseline:
        kind = "gold" if gold else "learned"
        lines.append(f"\nwin rate vs {baseline} ({kind} utility, same prompt and seed)")
        for policy, m in metrics["policies"].items():
            if policy != baseline and "win_rate" in m:
                rates = m["win_rate"][kind]
                lines.append(f"{policy:<14}" + "".join(f"{rates[n]:>14.2f}" for n in names))
    matrix_key = "cross_taste_gold" if "cross_taste_gold" in metrics else "cross_taste_reward"
    if matrix_key in metrics:
        what = "gold utility" if matrix_key == "cross_taste_gold" else "learned reward"
        lines.append(
            f"\n{metrics['cross_taste_policy']}: {what}, rows generated-for, columns scored-by"
        )
        for n, row in zip(names, metrics[matrix_key]):
            lines.append(f"{n:<14}" + "".join(f"{v:>14.3f}" for v in row))
    return "\n".join(lines)
