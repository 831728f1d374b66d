"""Stage cache: reuse a finished stage, rebuild a partial or corrupt one, never use it."""

import pytest

from plural_diffusion.cache import MANIFEST, cached_stage, verify


def make_builder(calls):
    def build(d):
        calls.append(d)
        (d / "weights.bin").write_bytes(b"\x01" * 1000)
        (d / "sub").mkdir()
        (d / "sub" / "config.json").write_text('{"a": 1}')

    return build


def test_second_call_reuses_the_stage(tmp_path):
    calls = []
    p1 = cached_stage("thing", {"x": 1}, make_builder(calls), root=tmp_path)
    p2 = cached_stage("thing", {"x": 1}, make_builder(calls), root=tmp_path)
    assert p1 == p2 and len(calls) == 1 and verify(p1) is None
    p3 = cached_stage("thing", {"x": 2}, make_builder(calls), root=tmp_path)
    assert p3 != p1 and len(calls) == 2


def test_corrupt_file_is_detected_and_rebuilt(tmp_path):
    calls = []
    path = cached_stage("thing", {"x": 1}, make_builder(calls), root=tmp_path)
    (path / "weights.bin").write_bytes(b"\x01" * 10)  # truncated
    assert "differs from the manifest" in verify(path)
    cached_stage("thing", {"x": 1}, make_builder(calls), root=tmp_path)
    assert len(calls) == 2 and (path / "weights.bin").stat().st_size == 1000


def test_interrupted_build_leaves_no_usable_stage(tmp_path):
    calls = []

    def dies(d):
        (d / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_stage("thing", {"x": 1}, dies, root=tmp_path)
    assert not any(p.name.startswith("thing-") for p in tmp_path.iterdir())
    path = cached_stage("thing", {"x": 1}, make_builder(calls), root=tmp_path)
    assert len(calls) == 1 and (path / MANIFEST).is_file()


def test_stage_without_manifest_is_rebuilt(tmp_path):
    calls = []
    path = cached_stage("thing", {"x": 1}, make_builder(calls), root=tmp_path)
    (path / MANIFEST).unlink()  # as if killed between files and manifest
    assert verify(path) == "no manifest (an interrupted build?)"
    cached_stage("thing", {"x": 1}, make_builder(calls), root=tmp_path)
    assert len(calls) == 2


def _build_slowly(d):
    """A build that takes a while and records each time it runs (in the cache's parent)."""
    import time

    with open(d.parent.parent / "builds.txt", "a") as f:
        f.write("built\n")
    (d / "half.bin").write_bytes(b"\x01" * 1000)
    time.sleep(0.5)
    (d / "config.json").write_text('{"a": 1}')


def _use_stage(root, results):
    path = cached_stage("shared", {"x": 1}, _build_slowly, root=root)
    results.put((str(path), verify(path), (path / "config.json").read_text()))


def test_processes_sharing_a_cache_build_a_stage_once_and_all_read_it_whole(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    root, results = tmp_path / "cache", ctx.Queue()
    procs = [ctx.Process(target=_use_stage, args=(root, results)) for _ in range(4)]
    for p in procs:
        p.start()
    seen = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert (tmp_path / "builds.txt").read_text() == "built\n"
    assert {s[0] for s in seen} == {str(root / next(root.glob("shared-*")).name)}
    assert all(reason is None and text == '{"a": 1}' for _, reason, text in seen)


def test_code_fingerprint_follows_the_source_of_the_named_modules(tmp_path, monkeypatch):
    import sys

    from plural_diffusion.cache import code_fingerprint

    package = tmp_path / "fp_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("X = 1\n")
    (package / "b.py").write_text("Y = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    whole, only_a = code_fingerprint("fp_pkg"), code_fingerprint("fp_pkg.a")
    assert code_fingerprint("fp_pkg") == whole  # stable
    (package / "b.py").write_text("Y = 2\n")
    assert code_fingerprint("fp_pkg") != whole  # a package covers every module in it
    assert code_fingerprint("fp_pkg.a") == only_a  # a module covers only itself
    sys.modules.pop("fp_pkg", None)
