"""The timm releases the tests and dev tools run, installed side by side under .cache/timm
by cachectl/releases.py (the installer `cachectl catalog build` uses)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASES_DIR = Path(os.environ.get("CACHECTL_TIMM_RELEASES", ROOT / ".cache" / "timm"))

# The releases the tests and tools run, oldest first, and `make wheelhouse` carries: one of
# each line's layouts and maths (0.6.12 does not import on 3.11). The shipped catalog holds
# more, by their layouts and most by their fingerprints too (`cachectl catalog list`);
# nothing here installs those.
CATALOG_RELEASES = ("0.4.12", "0.5.4", "0.6.13", "0.9.2", "0.9.16", "1.0.3", "1.0.9", "1.0.15", "1.0.20", "1.0.31")
# The tests' "timm not in this cachectl's catalog" (as a release newer than cachectl is): they take
# it out of the catalog they load (conftest.catalog_without).
UNCATALOGUED = "1.0.26"
# A release that does not import on Python 3.11 (a dataclass field with a mutable default):
# the tests' "the catalog build says why, at once".
UNIMPORTABLE = "0.6.11"


def release_dir(version: str) -> Path:
    """The folder holding timm==version, installed on first use."""
    # imported here: `make wheelhouse` reads the release lists with a bare python3, before
    # cachectl's dependencies are installed anywhere
    from cachectl.releases import install

    return install(version, RELEASES_DIR)

