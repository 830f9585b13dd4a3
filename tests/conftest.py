"""Shared fixtures: real timm releases side by side, checkpoints they made, and targets."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from cachectl import numerics

# as the cachectl and cachectld commands do, before torch runs anything: this process's
# proofs compare with the shipped fingerprints (cachectl/numerics.py)
numerics.pin()

import tools.crossversion  # noqa: E402
import tools.timm_releases
from cachectl.target import Target
from tools.crossversion import ARTIFACTS, ATOL, INSTALLED  # noqa: F401  (used by tests)
from tools.timm_releases import RELEASES_DIR

GB = 10**9
# What the slow tests write at most, measured (README, Testing): the checkpoints real releases
# make, the releases themselves, and pytest's temporary files (every test's, if all fail).
NEEDS = ((ARTIFACTS, 11 * GB), (RELEASES_DIR, GB // 5), (None, 3 * GB))  # None: pytest's temporary folder


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def pytest_collection_finish(session):
    """When slow tests are selected, fail at once if the disk cannot hold what they write."""
    if not any(item.get_closest_marker("slow") for item in session.items):
        return
    basetemp = session.config.option.basetemp or os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()
    wanted: dict[int, list] = {}  # per filesystem: [bytes still to write, folders]
    for cache, need in NEEDS:
        folder = Path(cache or basetemp).absolute()
        if cache and folder.exists():
            need = max(0, need - _size(folder))  # what an earlier run left is reused
        dev = os.stat(_existing(folder)).st_dev
        wanted.setdefault(dev, [0, []])
        wanted[dev][0] += need
        wanted[dev][1].append(folder)
    for need, folders in wanted.values():
        free = shutil.disk_usage(_existing(folders[0])).free
        if free < need:
            pytest.exit("not enough disk: the slow tests need %.1f GB free for %s, and %.1f GB are free. "
                        "Free some space (README, Testing, says what the suite keeps where), or run make test-fast."
                        % (need / GB, ", ".join(map(str, folders)), free / GB), returncode=1)


_FAST = [False]  # whether the running test is a fast one: it may use the timm beside cachectl only


def _release(version: str) -> None:
    if _FAST[0] and version != INSTALLED:
        raise AssertionError("this test runs timm %s: mark it @pytest.mark.slow (make test-fast runs no timm release)"
                             % version)


def make_checkpoint(version: str, *args, **kwargs):
    _release(version)
    return tools.crossversion.make_checkpoint(version, *args, **kwargs)


def python_for(version: str):
    _release(version)
    return tools.crossversion.python_for(version)


def run_in(version: str, *args, **kwargs):
    _release(version)
    return tools.crossversion.run_in(version, *args, **kwargs)


@pytest.fixture(autouse=True)
def fast_tests_run_no_release(request):
    """A test not marked slow may use the timm beside cachectl only, never install or run a release."""
    _FAST[0] = request.node.get_closest_marker("slow") is None
    yield
    _FAST[0] = False


@pytest.fixture(scope="session")
def targets():
    """Target(version) for each release, one long-lived agent each for the whole session."""
    opened: dict[str, Target] = {}

    def get(version: str) -> Target:
        if version not in opened:
            opened[version] = Target(None if version == INSTALLED else python_for(version))
        return opened[version]

    yield get
    for t in opened.values():
        t.close()


@pytest.fixture
def catalog_without(tmp_path, monkeypatch):
    """`hide(release)`: this process's cachectl sees the shipped catalog less that release,
    as a cachectl older than the release ships it (the same files, one release taken out)."""
    from cachectl import catalog

    def hide(release: str) -> None:
        folder = tmp_path / ("catalog-without-%s" % release)
        folder.mkdir()
        for src in catalog.CATALOG_DIR.iterdir():
            (folder / src.name).symlink_to(src)
        index = catalog.index_path()
        with gzip.open(index, "rt") as f:
            whole = catalog.expand(json.load(f), index)
        del whole["releases"][release]
        _replace_gz(folder / index.name, catalog.compact(whole))
        with gzip.open(catalog.fingerprints_path(), "rt") as f:
            fingerprints = json.load(f)
        fingerprints["releases"].pop(release, None)
        _replace_gz(folder / catalog.fingerprints_path().name, fingerprints)
        monkeypatch.setattr(catalog, "CATALOG_DIR", folder)
        assert release not in catalog.Catalog.load().releases

    return hide


def _replace_gz(path: Path, data: dict) -> None:
    path.unlink()  # a link to the shipped file: never written through
    with gzip.open(path, "wt", compresslevel=1) as f:
        json.dump(data, f)


@pytest.fixture
def roundtrip(targets, tmp_path):
    """Make `model` in `src`, convert it for `dst`, run it there: (conversion, max |diff|)."""
    from cachectl.convert import convert

    def go(model: str, src: str, dst: str, kwargs: dict | None = None, fmt: str = "pth"):
        made = make_checkpoint(src, model, kwargs, fmt)
        result = convert(made.path, tmp_path / ("%s-for-%s.safetensors" % (model, dst)), targets(dst))
        got = run_in(dst, {"name": result.model.name, "kwargs": dict(result.model.kwargs)}, result.output, tmp_path)
        assert got.shape == made.logits.shape
        return result, (got - made.logits).abs().max().item()

    return go


def wait_for(condition, what: str, daemon=None, *, timeout: float):
    """`condition()`'s first true value, polled; after `timeout` s, fail with the daemon's log."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    log = daemon.log.read_text()[-6000:] if daemon else ""
    raise AssertionError("gave up waiting for %s after %d s\n--- daemon log ---\n%s" % (what, timeout, log))


def alive(pid: int) -> bool:
    """Is `pid` a running process (not a zombie)?"""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
