"""What a load read, in one screen, before any training: `reward-models inspect PATH`.

summary = summarize(load_ratings("PARA/", on_error="skip"))
print(format_summary("PARA/", "para", summary))
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from reward_models.data.tables import RatingData


def summarize(data: RatingData) -> dict:
    """Counts of a loaded `RatingData`: raters, images, rows per rater, pairs and ties, skips.

    A rating is one row of either table (a score, or a pairwise choice), so `ratings_per_rater`
    counts both; it is None when nothing was kept.
    """
    per_rater = Counter(r for t in data.tables() for r in t.df["rater_id"])
    counts = np.array(list(per_rater.values()))
    scores, pairs = data.scores, data.pairs
    return {
        "raters": len(per_rater),
        "images": len(data.images),
        "ratings_per_rater": None
        if counts.size == 0
        else {
            "min": int(counts.min()),
            "median": float(np.median(counts)),
            "max": int(counts.max()),
        },
        "scores": 0 if scores is None else len(scores),
        "score_range": None
        if scores is None or len(scores) == 0
        else [float(scores.scores.min()), float(scores.scores.max())],
        "pairs": 0 if pairs is None else len(pairs),
        "ties": 0 if pairs is None else int(pairs.ties.sum()),
        "image_root": str(data.tables()[0].image_root) if data.tables() else None,
        "rows_read": data.report.rows_read,
        "rows_kept": data.report.rows_kept,
        "skipped": dict(sorted(data.report.skipped.items())),
    }


def format_summary(source, layout: str, summary: dict) -> str:
    """`summarize`'s counts as aligned lines under a heading naming the source and layout."""
    per = summary["ratings_per_rater"]
    spread = "-" if per is None else f"min {per['min']}, median {per['median']:g}, max {per['max']}"
    observed = summary["score_range"]
    scores = f"{summary['scores']}" + (
        "" if observed is None else f" (from {observed[0]:g} to {observed[1]:g})"
    )
    skipped = ", ".join(f"{n} {reason}" for reason, n in summary["skipped"].items()) or "none"
    rows = [
        ("raters", summary["raters"]),
        ("images", summary["images"]),
        ("ratings per rater", spread),
        ("scores", scores),
        ("pairs", summary["pairs"]),
        ("ties", summary["ties"]),
        ("rows read", summary["rows_read"]),
        ("rows kept", summary["rows_kept"]),
        ("skipped rows", skipped),
        ("images under", summary["image_root"] or "-"),
    ]
    return "\n".join([f"{source} ({layout})", *(f"  {k:<18} {v}" for k, v in rows)])
