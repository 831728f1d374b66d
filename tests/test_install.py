"""A non-editable `pip install .` carries everything the demo needs (the shipped configs, the toy
CLIP config): its `plural-diffusion demo --fast` runs from another directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOT_SOURCES = ("build", "dist", "*.egg-info", ".venv", ".git", "__pycache__", "outputs", "runs")


@pytest.mark.slow
def test_a_non_editable_install_runs_the_fast_demo_from_another_directory(tmp_path):
    # a copy of the sources, so the build leaves nothing in the checkout
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # torch, diffusers, ... (and pip, setuptools) come from this interpreter's site-packages,
    # after the new environment's own: only the package itself is installed
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (purelib / "shared-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no checkout on the path
    install = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)]
    done = subprocess.run(install, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    shutil.rmtree(src)  # nothing may be read from the sources any more

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [python, "-c", "import plural_diffusion; print(plural_diffusion.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=elsewhere,
        check=True,
    )
    assert where.stdout.startswith(str(venv)), where.stdout
    demo = [venv / "bin" / "plural-diffusion", "demo", "--fast"]
    demo += ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    done = subprocess.run(demo, capture_output=True, text=True, env=env, cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "metrics.json").is_file()
    assert (tmp_path / "out" / "report.html").is_file()
