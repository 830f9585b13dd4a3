"""Which paths in a watched folder the daemon takes, and what it hands to Cache.add for each."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cachectl.paths import SNAPSHOT_WEIGHTS, SUFFIXES

# Names that writers give a file until it is complete (browsers, curl, hf's downloader, editors).
TEMPORARY = (".tmp", ".part", ".partial", ".crdownload", ".incomplete", ".lock")

Signature = tuple[int, int]  # (size, mtime_ns) of the weights: a change means another take


@dataclass(frozen=True)
class Candidate:
    unit: Path  # what Cache.add gets: a checkpoint file, or an HF snapshot folder
    weights: Path  # the file whose writer must be done (in a snapshot, often a link into blobs/)

    def signature(self) -> Signature | None:
        """(size, mtime_ns) of the weights, following links; None if gone or not a regular file."""
        try:
            st = os.stat(self.weights)
        except OSError:  # vanished (rsync removes its temporaries), or unreadable: nothing to take
            return None
        return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def candidates(path: Path, top: Path, excluded: tuple[Path, ...] = ()) -> list[Candidate]:
    """What an event at `path`, inside the watched folder `top`, concerns: usually one unit, or none.

    Hidden names (rsync's temporaries, .git, the hub's .locks) and temporary suffixes are
    skipped; so is anything under `excluded` (the store itself, if a watch covers it).
    """
    try:
        inside = path.relative_to(top)
    except ValueError:
        return []
    if any(part.startswith(".") for part in inside.parts) or path.name.endswith(TEMPORARY):
        return []
    if any(path == x or x in path.parents for x in excluded):
        return []
    if not _stays_inside(path, top):
        return []  # a link out of the watched folder: what it reaches was not put here to be taken
    if _is_snapshot(path.parent):
        if path.name in SNAPSHOT_WEIGHTS or path.name == "config.json":
            snapshot = snapshot_candidate(path.parent)
            return [snapshot] if snapshot else []
        return []
    if path.parent.name == "blobs" and path.parent.parent.name.startswith("models--"):
        # A hub cache copied whole: the snapshot's weights are links to this blob.
        # os.path.realpath, unlike Path.resolve, does not raise on a loop of links
        real = os.path.realpath(path)
        snapshots = path.parent.parent / "snapshots"
        found = [snapshot_candidate(s) for s in _folders(snapshots)]
        return [c for c in found if c and os.path.realpath(c.weights) == real]
    if path.name.endswith(SUFFIXES):
        return [Candidate(path, path)]
    return []


def snapshot_candidate(folder: Path) -> Candidate | None:
    for name in SNAPSHOT_WEIGHTS:
        if os.path.lexists(folder / name):
            return Candidate(folder, folder / name)
    return None


def _is_snapshot(folder: Path) -> bool:
    # <hub>/models--timm--resnet18.a1_in1k/snapshots/<revision>/
    return folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--")


def _folders(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except OSError:  # not there (yet): the snapshot's own events will bring it
        return []


def _stays_inside(path: Path, top: Path) -> bool:
    """Whether `path`, its links followed, is inside `top` (a hub snapshot's links into blobs/ are)."""
    real, inside = os.path.realpath(path), os.path.realpath(top)
    return real == inside or real.startswith(inside.rstrip(os.sep) + os.sep)
