"""Real timm releases installed side by side, each in its own folder, for tools and tests.

A release is installed with `pip install --no-deps --target` and used by putting its
folder first on PYTHONPATH of an interpreter that has torch (and torchvision).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASES_DIR = Path(os.environ.get("CACHECTL_TIMM_RELEASES", ROOT / ".cache" / "timm"))

# The releases the shipped catalog covers, oldest first (0.6.12 does not import on 3.11).
CATALOG_RELEASES = ("0.4.12", "0.5.4", "0.6.13", "0.9.2", "0.9.16", "1.0.3", "1.0.9", "1.0.15", "1.0.20", "1.0.31")
# A release the shipped catalog leaves out on purpose: the tests' "timm newer than this cachectl".
UNCATALOGUED = "1.0.26"


def release_dir(version: str) -> Path:
    """The folder holding timm==version, installed on first use."""
    target = RELEASES_DIR / version
    if (target / "timm" / "__init__.py").exists():
        return target
    tmp = RELEASES_DIR / (".%s.%d.partial" % (version, os.getpid()))
    RELEASES_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp), "timm==%s" % version],
        check=True,
    )
    try:
        os.rename(tmp, target)
    except OSError:  # another process installed it first
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
    return target


def release_env(version: str) -> dict[str, str]:
    """Environment variables that make this interpreter import timm==version first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(release_dir(version))] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env
