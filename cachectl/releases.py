"""Real timm releases installed side by side, each in its own folder: what the catalog is built from.

A release is installed with `pip install --no-deps --target` (from the index pip is
configured with, or a wheelhouse: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR) and used by putting its
folder first on PYTHONPATH of an interpreter that has torch. Nothing is installed into the
interpreter itself.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import platformdirs

from .errors import CachectlError


def work_dir() -> Path:
    """Where releases and their dumps go: $CACHECTL_BUILD_DIR, else the user's cache folder."""
    return Path(os.environ.get("CACHECTL_BUILD_DIR") or platformdirs.user_cache_dir("cachectl"))


def releases_dir() -> Path:
    """$CACHECTL_TIMM_RELEASES, else timm/ in the work folder."""
    return Path(os.environ.get("CACHECTL_TIMM_RELEASES") or work_dir() / "timm")


def install(version: str, folder: Path | None = None) -> Path:
    """The folder holding timm==version (under `folder`, default releases_dir()), installed on first use."""
    folder = folder or releases_dir()
    target = folder / version
    if (target / "timm" / "__init__.py").exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (".%s.%d.partial" % (version, os.getpid()))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
                           "timm==%s" % version], capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise CachectlError(None, "cannot install timm %s (%s)" % (version, last),
                            "Check the version; offline, point pip at a wheelhouse that has it: "
                            "PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheelhouse.")
    try:
        os.rename(tmp, target)
    except OSError:  # another process installed it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def env_for(version: str, folder: Path | None = None) -> dict[str, str]:
    """Environment variables that make this interpreter import timm==version first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(install(version, folder))]
                                        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


# Runs a script of this package in a release's interpreter without this package's folder on
# sys.path, so its module names never shadow the release's (as target.py runs the agent).
BOOT = ("import runpy, sys; p = sys.argv[1]; sys.argv = sys.argv[1:]; "
        "sys.path = [x for x in sys.path if x not in ('', '.')]; runpy.run_path(p, run_name='__main__')")


def script(name: str) -> str:
    return str(Path(__file__).resolve().parent / name)
