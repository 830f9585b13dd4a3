"""Reclaiming disk: a plan first (what goes, what it frees), then the act.

Never removed: a pinned version, the newest version of a name, anything an environment
needs to load its pins, an entry still being written (its lock is held). References go
before the blobs they point to, so an interrupted prune leaves a store that still reads.
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .errors import CachectlError
from .scan import Snapshot, scan
from .store import Store, Version
from .tempnames import writer_alive

# A blob no manifest names may be one whose manifest is about to be written.
ORPHAN_GRACE = 3600
# Sources whose locks are held together while the names are read again: one read of the
# names per batch, not per source, and a bounded number of open lock files.
LOCK_BATCH = 256


@dataclass(frozen=True)
class Policy:
    keep_last: int | None = None  # per name
    older_than: float | None = None  # seconds
    max_size: int | None = None  # bytes, for the whole store

    @property
    def empty(self) -> bool:
        return self.keep_last is None and self.older_than is None and self.max_size is None


@dataclass(frozen=True)
class PrunePlan:
    versions: tuple[Version, ...]
    manifests: tuple[Path, ...]  # sources, converted entries and links that go with them
    blobs: tuple[Path, ...]
    leftovers: tuple[Path, ...]  # temporaries of interrupted writes
    kept: tuple[tuple[str, str], ...]  # (ref, why) for versions a policy chose but a rule kept
    freed: int
    # the source each manifest and blob belongs to: deleted only if still unreferenced then
    owners: Mapping[Path, str] = field(default_factory=dict, compare=False)
    short_of: int = 0  # bytes over --max-size that no allowed removal could free

    def execute(self, store: Store) -> int:
        """Delete what the plan found, re-checked at the moment of deletion: a version
        pinned meanwhile stays, and so does a source that a version added meanwhile names."""
        pinned = {(n, v) for pins in store.all_pins().values() for n, v in pins.items()}
        by_name: dict[str, set[int]] = {}
        for v in self.versions:
            if (v.name, v.version) not in pinned:
                by_name.setdefault(v.name, set()).add(v.version)
        for name, gone in by_name.items():
            with store.lock("name:" + name):
                store.put_versions(name, [v for v in store.versions(name) if v.version not in gone])
        by_source: dict[str, list[Path]] = defaultdict(list)
        for path in self.manifests + self.blobs:
            by_source[self.owners.get(path, "")].append(path)
        _unlink(by_source.pop("", []))
        shas = sorted(by_source)  # one order for every prune: two never wait on each other
        for i in range(0, len(shas), LOCK_BATCH):
            batch = shas[i:i + LOCK_BATCH]
            with ExitStack() as held:
                # add holds a source's lock from storing its bytes until a version names them
                for sha in batch:
                    held.enter_context(store.lock("source:" + sha))
                named = {v.source for v in store.all_versions()}
                for sha in batch:
                    if sha not in named:
                        _unlink(by_source[sha])
        _unlink(p for p in self.leftovers if not writer_alive(p))  # a writer on another host may have resumed
        return self.freed


def _unlink(paths) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise CachectlError(None, "cannot read the age %r" % text, "Write it like 30d, 12h, 90m or 2w.")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", text.lower())
    if not m:
        raise CachectlError(None, "cannot read the size %r" % text, "Write it like 500M, 20G or 1.5T.")
    unit = m.group(2).rstrip("b")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _envs_of(snap: Snapshot) -> Mapping[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for link in snap.links:
        out[link.source].append(link.env)
    return out


def plan(store: Store, policy: Policy, now: float | None = None, snapshot: Snapshot | None = None) -> PrunePlan:
    if policy.empty:
        raise CachectlError(None, "prune needs a policy", "Give --keep-last N, --older-than AGE or --max-size SIZE.")
    now = time.time() if now is None else now
    snap = snapshot or scan(store)
    versions, sources, converted = snap.versions, snap.sources, snap.converted
    pinned = {(n, v) for pins in snap.pins.values() for n, v in pins.items()}
    envs_of = _envs_of(snap)
    converted_of = snap.by_source()[1]
    refs: dict[str, int] = defaultdict(int)  # versions still naming each source
    by_name: dict[str, list[Version]] = defaultdict(list)
    for v in versions:
        by_name[v.name].append(v)
        refs[v.source] += 1
    for vs in by_name.values():
        vs.sort(key=lambda v: v.version)
    newest = {name: vs[-1].version for name, vs in by_name.items()}

    envs = [e.name for e in snap.envs]
    name_locked: dict[str, bool] = {}
    # a view links converted files: what a view serves, or served moments ago, stays
    in_views = snap.linked
    viewed = {c.source for c in converted.values()
              if store.converted_path(c).name in in_views or (c.torch_sha256 and store.torch_path(c).name in in_views)}

    def being_written(v: Version) -> bool:
        if v.name not in name_locked:
            name_locked[v.name] = store.is_locked("name:" + v.name)
        # a conversion in flight has not written its link yet: only those can be busy
        return name_locked[v.name] or any(
            store.is_locked("convert:%s:%s" % (v.source, env)) for env in envs if env not in envs_of[v.source])

    def protection(v: Version) -> str | None:
        if (v.name, v.version) in pinned:
            return "pinned"
        if newest[v.name] == v.version:
            return "newest version of %s" % v.name
        if being_written(v):
            return "being written"
        if v.source in viewed:
            return "served by a view"
        return None

    def size_of(sha: str) -> int:
        s = sources.get(sha)
        return (s.size if s else 0) + sum(c.size for c in converted_of[sha])

    chosen: list[Version] = []
    kept: list[tuple[str, str]] = []
    gone_sources: set[str] = set()
    freed = 0

    def take(v: Version) -> None:
        nonlocal freed
        chosen.append(v)
        refs[v.source] -= 1
        if refs[v.source] == 0:
            gone_sources.add(v.source)
            freed += size_of(v.source)

    for vs in by_name.values():
        for i, v in enumerate(vs):
            too_many = policy.keep_last is not None and i < len(vs) - policy.keep_last
            too_old = policy.older_than is not None and v.added < now - policy.older_than
            if too_many or too_old:
                why = protection(v)
                if why:
                    kept.append((v.ref, why))
                else:
                    take(v)
    short_of = 0
    if policy.max_size is not None:
        total = sum(size_of(sha) for sha in sources)
        decided = {v.ref for v in chosen} | {ref for ref, _ in kept}
        for v in sorted(versions, key=lambda v: v.added):
            if total - freed <= policy.max_size:
                break
            if v.ref in decided:
                continue
            why = protection(v)
            if why:
                kept.append((v.ref, why))
            else:
                take(v)
        short_of = max(0, total - freed - policy.max_size)

    manifests, blobs, owners = _files_of(store, gone_sources, envs_of, converted_of)
    named = set(sources) | {c.sha256 for c in converted.values()} | {c.torch_sha256 for c in converted.values()}
    orphans = _orphan_blobs(store, snap, named | {n.split(".")[0] for n in in_views}, now)
    # a leftover is a temporary whose writer is gone: on another host, one it stopped writing an hour ago
    leftovers = [Path(p) for p in snap.leftovers if not writer_alive(Path(p), now)]
    freed += sum(p.stat().st_size for p in orphans + leftovers)
    return PrunePlan(tuple(sorted(chosen, key=lambda v: (v.name, v.version))), tuple(manifests),
                     tuple(blobs + orphans), tuple(leftovers), tuple(sorted(kept)), freed, owners, short_of)


def _files_of(store: Store, gone: set[str], envs_of, converted_of) -> tuple[list[Path], list[Path], dict[Path, str]]:
    """Manifests and blobs of the sources in `gone`, references before files, and whose they are."""
    manifests: list[Path] = []
    blobs: list[Path] = []
    owners: dict[Path, str] = {}
    for sha in sorted(gone):
        first = len(manifests), len(blobs)
        manifests += [store.links / env / ("%s.json" % sha) for env in envs_of[sha]]
        for c in converted_of[sha]:
            manifests.append(store.converted / ("%s.json" % c.id))
            blobs.append(store.converted_path(c))
            if c.torch_sha256:
                blobs.append(store.torch_path(c))
        manifests.append(store.sources / ("%s.json" % sha))
        blobs.append(store.blob_path(sha))
        owners.update({p: sha for p in manifests[first[0]:] + blobs[first[1]:]})
    return manifests, blobs, owners


def removal(store: Store, versions: list[Version], snapshot: Snapshot | None = None) -> PrunePlan:
    """The plan of `cachectl rm`: these versions, and the files only they use.

    A pinned version is refused; files a view still links (a reader may be on its way to
    them) stay for a later prune."""
    snap = snapshot or scan(store)
    pinned = {(n, v): env for env, pins in snap.pins.items() for n, v in pins.items()}
    for v in versions:
        if (v.name, v.version) in pinned:
            env = pinned[(v.name, v.version)]
            raise CachectlError(None, "%s is pinned in %s" % (v.ref, env),
                                "Unpin it first: cachectl unpin %s --env %s." % (v.name, env))
    refs: dict[str, int] = defaultdict(int)
    for v in snap.versions:
        refs[v.source] += 1
    for v in versions:
        refs[v.source] -= 1
    gone = {v.source for v in versions if refs[v.source] == 0}
    manifests, blobs, owners = _files_of(store, gone, _envs_of(snap), snap.by_source()[1])
    in_views = snap.linked
    kept = tuple((str(b), "a view links it") for b in blobs if b.name in in_views)
    blobs = [b for b in blobs if b.name not in in_views]
    freed = sum(b.stat().st_size for b in blobs if b.exists())
    return PrunePlan(tuple(versions), tuple(manifests), tuple(blobs), (), kept, freed, owners)


def _orphan_blobs(store: Store, snap: Snapshot, named: set[str], now: float) -> list[Path]:
    out = []
    for rel in snap.blobs:
        if rel.rpartition("/")[2].split(".")[0] in named:
            continue
        path = store.blobs / rel
        try:
            if path.stat().st_mtime < now - ORPHAN_GRACE:
                out.append(path)
        except FileNotFoundError:
            pass  # removed since the scan
    return out

