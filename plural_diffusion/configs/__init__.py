"""The YAML configs shipped with the package (installed with it, as package data).

    config_path("toy.yaml")              -> the shipped toy training config
    config_path("my/experiment.yaml")    -> that file

An existing file is used as given; a bare name, or a path under `configs/` (where a checkout of
the repository kept them before they moved into the package), names the shipped config.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent


def config_path(name: str | Path) -> Path:
    """The config file `name` means: the file itself if it exists, else the shipped one."""
    path = Path(name)
    if path.is_file() or path.is_absolute():
        return path
    if path.parent in (Path("."), Path("configs")) and (CONFIGS / path.name).is_file():
        return CONFIGS / path.name
    return path  # load_config names it in its "not found" error
