"""report.html is one self-contained file that a browser renders completely: a headline, every
image decoded, no console errors, nothing fetched from anywhere.

The browser test drives Debian's chromium through chromedriver (`make test` installs both with
apt-get when missing). Without them it skips, unless PLURAL_DIFFUSION_REQUIRE_BROWSER=1 (CI).
"""

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from plural_diffusion.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
NAMES = ["noir", "sunny", "vivid"]


def synthetic_evaluation():
    """A small metrics dict in the layout `evaluate_policies` writes, and tiny images."""
    g = torch.Generator().manual_seed(0)

    def per_cluster(values):
        return dict(zip(NAMES, values))

    def policy(gold, reward, matched):
        m = {
            "tastes": NAMES if matched else ["none"],
            "gold_per_cluster": per_cluster(gold),
            "worst_cluster_gold": min(gold),
            "reward_per_cluster": per_cluster(reward),
            "worst_cluster_reward": min(reward),
            "vendi": 1.5 + sum(gold),
            "mean_pairwise_distance": 0.01 * sum(gold),
            "vendi_within_taste": per_cluster([1.1, 1.2, 1.3]) if matched else {"none": 2.0},
            "mean_pairwise_distance_within_taste": per_cluster([0.01, 0.02, 0.03])
            if matched
            else {"none": 0.04},
            "win_rate": {
                "baseline": "mean",
                "gold": per_cluster([0.4, 0.9, 1.0]),
                "learned": per_cluster([0.5, 0.8, 0.9]),
            },
        }
        if matched:
            m["cross_taste_gold"] = [[0.93, 0.01, 0.01], [0.01, 0.95, 0.05], [0.31, 0.2, 0.51]]
            m["cross_taste_reward"] = [[4.0, 1.0, 1.0], [1.0, 4.5, 2.0], [2.0, 2.0, 3.0]]
        return m

    metrics = {
        "clusters": {"names": NAMES, "shares": [0.6, 0.3, 0.1]},
        "eval": {
            "prompts": ["an image of one circle", "an image of two squares"],
            "seeds": [1, 2],
            "steps": 20,
            "guidance": 4.0,
            "eta": 1.0,
            "baseline": "mean",
            "gold": True,
        },
        "policies": {
            "base": policy([0.64, 0.11, 0.04], [3.0, 2.0, 1.0], False),
            "mean": policy([0.95, 0.002, 0.016], [4.0, 0.5, 0.7], False),
            "matched": {
                **policy([0.935, 0.95, 0.508], [4.1, 4.4, 3.0], True),
                "experts_from": per_cluster(["epoch-0020", "epoch-0020", "epoch-0008"]),
            },
            "maxmin": {
                **policy([0.41, 0.38, 0.21], [3.1, 3.0, 2.2], False),
                "lottery": {
                    "of": "matched",
                    "shares": per_cluster([0.4, 0.3, 0.3]),
                    "made_for": ["noir", "sunny", "noir", "vivid"],
                },
            },
        },
        "headline": {"policy": "matched", "baseline": "mean"},
        "cross_taste_gold": [[0.93, 0.01, 0.01], [0.01, 0.95, 0.05], [0.31, 0.2, 0.51]],
        "cross_taste_policy": "matched",
        "cross_taste_diagonal_dominance": {
            "by_column": [True, True, True],
            "all_columns": True,
            "by_row": [True, True, True],
        },
        "overoptimisation": {
            "matched": {
                "epochs": [0, 4, 8],
                "n_seeds": 2,
                "reward_per_cluster": per_cluster([[3, 4, 5], [2, 4, 5], [1, 2, 3]]),
                "gold_per_cluster": per_cluster(
                    [[0.6, 0.9, 0.9], [0.1, 0.8, 0.95], [0.04, 0.3, 0.5]]
                ),
                "vendi_within_taste": [2.4, 1.6, 1.2],
            }
        },
        "reward_heads": {
            "mean": per_cluster([0.88, 0.24, 0.36]),
            "rater": per_cluster([0.92, 0.82, 0.80]),
        },
    }

    def pictures(n=4):  # [P * S, 3, 8, 8]
        return torch.rand((n, 3, 8, 8), generator=g)

    images = {
        "base": {"none": pictures()},
        "mean": {"none": pictures()},
        "matched": {name: pictures() for name in NAMES},
        "maxmin": {"none": pictures()},
    }
    return metrics, images


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    metrics, images = synthetic_evaluation()
    return write_report(tmp_path_factory.mktemp("report") / "report.html", metrics, images)


def test_report_is_one_self_contained_file(report_file):
    page = report_file.read_text()
    assert "Matched vs mean, per cluster" in page
    assert "maxmin is taste-blind: each of its images is matched's image for a cluster" in page
    assert "(noir 40%, sunny 30%, vivid 30%)" in page
    assert "Each taste's expert in matched comes from the checkpoint" in page
    assert "(noir epoch-0020, sunny epoch-0020, vivid epoch-0008)" in page
    sources = re.findall(r"""(?:src|href)=["']([^"']*)["']""", page)
    assert len(sources) >= 8 and all(s.startswith("data:") for s in sources)  # nothing to fetch
    assert not re.search(r"https?://|url\(", re.sub(r"data:[^\"']*", "", page))
    for section in (
        "Summary",
        "Win rate against mean",
        "cross-taste matrix",
        "Diversity",
        "Over-optimisation",
        "Images",
        "Reward heads",
        "gold vs diversity of matched",
    ):
        assert section in page, section


def browser_or_skip():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    reason = None
    if missing:
        reason = f"{' and '.join(missing)} not installed (make test installs them with apt-get)"
    else:
        try:
            import selenium  # noqa: F401
        except ImportError:
            reason = "selenium is not installed (pip install -e '.[dev]')"
    if reason is not None:
        if os.environ.get("PLURAL_DIFFUSION_REQUIRE_BROWSER") == "1":
            pytest.fail(f"PLURAL_DIFFUSION_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)


@contextlib.contextmanager
def headless_chromium():
    """Debian's chromium through its chromedriver (skipped without them, unless
    PLURAL_DIFFUSION_REQUIRE_BROWSER=1), in a throwaway profile, with the browser's log kept."""
    browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="pd-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: selenium-manager never looks for (or downloads) one
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_report_renders_in_headless_chromium_with_every_image_and_no_errors(report_file):
    with headless_chromium() as driver:
        driver.get(report_file.resolve().as_uri())
        assert "Matched vs mean, per cluster" in driver.title
        assert driver.find_element("tag name", "h1").text == "Matched vs mean, per cluster"
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt]);"
        )
        assert len(images) >= 8
        broken = [alt for complete, width, alt in images if not complete or width <= 0]
        assert not broken, broken
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
