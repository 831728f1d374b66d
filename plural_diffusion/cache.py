"""A cache of finished stages (toy world, tiny models, trained heads), keyed by config hash.

A stage's key holds its config and a fingerprint of the code that builds it (`code_fingerprint`
of the modules it runs), so editing that code retires its cached stages instead of serving
results the new code would not produce.

A stage directory is complete only when it holds a manifest listing every file with its size and
sha256, written last. A directory without one (a run killed mid-way) or whose files disagree with
it (a corrupt file) is rebuilt, never used. Stages are built in a temporary sibling directory and
renamed into place, so a reader never sees half a stage. Building holds a lock file per stage, so
processes sharing a cache (demos side by side) build each stage once: the others wait for it and
reuse it, and no process clears away a build still in progress.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from reward_models.io import atomic_dir, file_sha256, write_json

log = logging.getLogger(__name__)

MANIFEST = ".complete.json"
# Bump when a change to the code makes old cached stages wrong even for an unchanged config.
CACHE_VERSION = 1


def cache_root() -> Path:
    """$PLURAL_DIFFUSION_CACHE, else $XDG_CACHE_HOME/plural-diffusion, else ~/.cache/..."""
    if env := os.environ.get("PLURAL_DIFFUSION_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "plural-diffusion"


def code_fingerprint(*modules: str) -> str:
    """sha256 (12 hex digits) of the source of the named modules or packages (every .py file
    under a package), e.g. code_fingerprint("plural_diffusion.ddpo", "reward_models")."""
    import importlib.util

    digest = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        origin = Path(spec.origin)
        files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        for path in files:
            digest.update(f"{name}:{path.relative_to(origin.parent)}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def config_hash(config: dict) -> str:
    """12 hex digits identifying a config (and the cache version)."""
    blob = json.dumps({"v": CACHE_VERSION, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path, config: dict) -> None:
    files = {
        str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in _files(root)
    }
    write_json(root / MANIFEST, {"config": config, "files": files})


def verify(root: Path) -> str | None:
    """None when `root` is a complete stage, else the reason it is not."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        return "no manifest (an interrupted build?)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "unreadable manifest"
    for rel, meta in files.items():
        path = root / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != meta["size"] or file_sha256(path) != meta["sha256"]:
            return f"{rel} differs from the manifest"
    return None


@contextmanager
def _stage_lock(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (released when its holder exits, however);
    where the platform has no fcntl, no lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process to finish building %s", lock.stem)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_stage(
    name: str,
    config: dict,
    build: Callable[[Path], None],
    root: Path | None = None,
    rebuild: bool = False,
) -> Path:
    """Directory of stage `name` for `config`; `build(tmp_dir)` fills it when not cached yet."""
    root = Path(root) if root is not None else cache_root()
    path = root / f"{name}-{config_hash(config)}"
    if not rebuild and verify(path) is None:
        log.info("reusing cached %s at %s", name, path)
        return path
    with _stage_lock(root / f".{path.name}.lock"):
        if path.exists():  # perhaps built by another process while this one waited
            reason = verify(path)
            if reason is None and not rebuild:
                log.info("reusing cached %s at %s", name, path)
                return path
            if reason is not None:
                log.warning("cached %s at %s is unusable (%s); rebuilding", name, path, reason)
        for stale in root.glob(f"*{path.name}.*.tmp"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_dir(path) as tmp:
            build(tmp)
            write_manifest(tmp, config)
    return path
