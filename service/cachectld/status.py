"""The daemon's status file, <root>/cachectld.status.json: what `cachectl status` reads.

Written atomically (Store.write_json) every few seconds and when something changes, so a
reader can tell a live daemon (fresh file, pid alive on its host) from a dead one.
"""
from __future__ import annotations

import socket
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cachectl.errors import CachectlError
from cachectl.store import Store
from cachectl.tempnames import pid_alive

from .config import Watch

STATUS_NAME = "cachectld.status.json"
FORMAT = 1
KEEP = 50  # recent results and failures kept
WRITE_EVERY = 5.0  # seconds between two writes when nothing changes
FRESH = 30.0  # a status file older than this is a dead or hung daemon's


@dataclass(frozen=True)
class Result:
    """What became of one unit taken from a watched folder."""

    path: str
    size: int
    mtime_ns: int
    ok: bool
    finished: float  # time.time()
    seconds: float
    version: str | None = None  # name@N it is stored as
    new_version: bool = False  # False: the same bytes were already the newest version
    error: str | None = None  # why it failed, for a person
    retry: bool = False  # not the file's fault for sure (its worker died): taken again at the next start
    again_in: float | None = None  # not the file's fault (the store's disk is full): taken again this many seconds on


@dataclass(frozen=True)
class Worker:
    pid: int
    state: str  # starting | idle | converting
    path: str | None = None
    since: float | None = None  # time.time() the conversion started


@dataclass(frozen=True)
class Status:
    pid: int
    host: str
    started: float
    updated: float
    root: str
    config: str | None
    watch: tuple[Watch, ...]
    workers: tuple[Worker, ...]
    queued: int  # complete, waiting for a worker
    waiting: int  # seen, waiting for the writer to finish (or for room in the queue)
    recent: tuple[Result, ...]
    failures: tuple[Result, ...]
    scanned: float | None = None  # when the last full scan of every watched folder ended
    stopped: float | None = None  # set by the last write of a clean stop
    ticks: int | None = None  # when its process started (clock ticks since boot): a pid reused since is another process
    format: int = field(default=FORMAT)

    @property
    def in_flight(self) -> tuple[Worker, ...]:
        return tuple(w for w in self.workers if w.state == "converting")

    @property
    def uptime(self) -> float:
        return (self.stopped or self.updated) - self.started

    def running(self, now: float | None = None) -> bool:
        """Alive: not stopped, written lately, and (on this host) its pid exists."""
        now = time.time() if now is None else now
        if self.stopped or now - self.updated > FRESH:
            return False
        if self.host != socket.gethostname():
            return True
        return pid_alive(self.pid, self.ticks)

    def to_json(self) -> dict:
        out = asdict(self)
        out["watch"] = [{"path": str(w.path), "polling": w.polling, "why": w.why} for w in self.watch]
        out["in_flight"] = [asdict(w) for w in self.in_flight]  # derived, for readers of the file
        out["uptime"] = self.uptime
        return out

    @classmethod
    def from_json(cls, raw: dict) -> "Status":
        raw = {k: v for k, v in raw.items() if k not in ("in_flight", "uptime")}
        raw["watch"] = tuple(Watch(Path(w["path"]), w["polling"], w["why"]) for w in raw["watch"])
        raw["workers"] = tuple(Worker(**w) for w in raw["workers"])
        raw["recent"] = tuple(Result(**r) for r in raw["recent"])
        raw["failures"] = tuple(Result(**r) for r in raw["failures"])
        return cls(**raw)


class History:
    """The last results, and the units whose last take failed (dropped once they succeed)."""

    def __init__(self, previous: Status | None = None):
        self.recent: deque[Result] = deque(previous.recent if previous else (), maxlen=KEEP)
        # carried over a restart: the daemon retries a failed file only when it changes
        self._failures = {r.path: r for r in (previous.failures if previous else ())}

    def add(self, result: Result) -> None:
        self.recent.append(result)
        self._failures.pop(result.path, None)
        if not result.ok:
            self._failures[result.path] = result
            while len(self._failures) > KEEP:
                del self._failures[next(iter(self._failures))]

    @property
    def failures(self) -> tuple[Result, ...]:
        return tuple(self._failures.values())


def status_path(root: Path) -> Path:
    return Path(root) / STATUS_NAME


def read_status(root: Path) -> Status | None:
    """The status the last daemon on the store at `root` wrote, or None if none ever ran."""
    path = status_path(root)
    raw = Store.read_json(path)
    if raw is None:
        return None
    try:
        return Status.from_json(raw)
    except (KeyError, TypeError) as exc:
        raise CachectlError(path, "is damaged or from another version of cachectld (%s)" % exc,
                            "Remove it: a running daemon writes it again within %d seconds." % WRITE_EVERY)


def write_status(store: Store, status: Status) -> None:
    store.write_json(status_path(store.root), status.to_json())

