"""The store's own catalog releases: a timm newer than this cachectl never needs a new cachectl.

When an environment's timm is not in the shipped catalog, `env add` and `env refresh`
record every model's layout in that environment's own interpreter (the dump `cachectl
catalog build` runs) into <root>/catalog/dumps/<release>.jsonl, and merge the dumps with
the shipped catalog into <root>/catalog/<stamp>/. Identification then knows the release:
the files it makes are tagged with it and its models are found. The stamp names the
shipped catalog and the dumps a merge was made from, so a cachectl upgrade (another
shipped catalog) merges again rather than read a stale one. The store holds no
fingerprints of such a release: conversions for it prove their math by running
(cachectl/proof.py).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

from . import catalog_build
from .catalog import Catalog, compact, fingerprints_path, index_path, layouts_path
from .store import Store

STALE_SECONDS = 3600  # a daemon reads a catalog's layouts lazily, long after loading its index


def folder(store: Store) -> Path:
    return store.root / "catalog"


def dumps(store: Store) -> dict[str, Path]:
    """{release: finished dump} of the releases this store catalogued itself."""
    found = {}
    for path in sorted((folder(store) / "dumps").glob("*.jsonl")):
        st = path.stat()
        if _finished(path, st.st_size, st.st_mtime_ns):
            found[path.stem] = path
    return found


@functools.lru_cache(maxsize=64)
def _finished(path: Path, size: int, mtime_ns: int) -> bool:
    # asked on every read of the cache's catalog: read a dump through once per change, not each time
    return catalog_build._finished(path)


def stamp(store: Store) -> str:
    """Which shipped catalog and which of the store's dumps a merge is made of; "" for none."""
    own = dumps(store)
    if not own:
        return ""
    h = hashlib.sha256(_shipped_digest().encode())
    for release, path in own.items():
        h.update(("%s:%d\n" % (release, path.stat().st_size)).encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _shipped_digest() -> str:
    h = hashlib.sha256()
    for path in (index_path(), fingerprints_path()):
        try:
            h.update(path.read_bytes())
        except FileNotFoundError:
            h.update(b"-")
    return h.hexdigest()


def load(store: Store) -> Catalog:
    """The shipped catalog, with the releases this store catalogued merged in."""
    key = stamp(store)
    if not key:
        return Catalog.load()
    merged = folder(store) / key / index_path().name
    if not merged.exists():
        try:
            _merge(store, key)
        except PermissionError:
            return Catalog.load()  # a reader of a shared store: the daemon's account merges it
    return Catalog.load(merged)


def catalogue(store: Store, python: str, release: str, say: Callable[[str], None]) -> Catalog:
    """Record `release` as the interpreter `python` has it, merge it in; the new catalog."""
    out = folder(store) / "dumps" / ("%s.jsonl" % release)
    store.mkdir(out.parent)
    with store.lock("catalog:" + release):
        catalog_build.record(out, python, None, release, say)
    say("timm %s: catalogued in %s" % (release, folder(store)))
    return load(store)


def _merge(store: Store, key: str) -> None:
    with store.lock("catalog"):
        target = folder(store) / key
        if (target / index_path().name).exists():
            return
        index, layouts = catalog_build.merge(*catalog_build.shipped(), dumps(store))
        # the layouts and fingerprints first: the index is what says a merge is complete
        store.write_file(target / layouts_path().name, gzip.compress(json.dumps(layouts, separators=(",", ":")).encode()))
        if fingerprints_path().exists():
            store.write_file(target / fingerprints_path().name, fingerprints_path().read_bytes())
        store.write_file(target / index_path().name, gzip.compress(json.dumps(compact(index), separators=(",", ":")).encode()))
        # an older merge goes once no process can still be on its way to reading it
        for old in folder(store).iterdir():
            if old.is_dir() and old.name not in ("dumps", key) and time.time() - old.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
