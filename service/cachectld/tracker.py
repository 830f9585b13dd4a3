"""When a writer is done with a file: close events, renames into place, or a quiet period.

The watchers and the scanner report what they see (`observe`); the main loop asks for the
files that are complete (`take`) and reports what became of them (`finish`). A unit is
taken again only when its signature (size, mtime) differs from the one last finished, so
a failed file is retried when it changes, and a rescan never repeats work.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .candidates import Candidate, Signature


@dataclass(frozen=True)
class Job:
    path: Path  # the unit handed to Cache.add
    signature: Signature  # what it was when taken


@dataclass
class _Pending:  # private and mutable: updated in place under the tracker's lock
    candidate: Candidate
    signature: Signature
    since: float  # when the signature last changed (monotonic)
    closed: bool  # the writer closed it, or renamed it into place, at this signature


class Tracker:
    def __init__(self, quiet_seconds: float, done: dict[str, Signature] | None = None):
        self.quiet_seconds = quiet_seconds
        self._lock = threading.Lock()
        self._pending: dict[Path, _Pending] = {}
        self._done: dict[str, Signature] = dict(done or {})
        self._done_changed = False

    def observe(self, candidate: Candidate, closed: bool, now: float) -> bool:
        """Note an event or a scan hit. True when the main loop should look before it planned to."""
        signature = candidate.signature()
        with self._lock:
            pending = self._pending.get(candidate.unit)
            if signature is None:
                self._pending.pop(candidate.unit, None)
                return False
            if pending is None:
                if self._done.get(str(candidate.unit)) == signature:
                    return False  # a rescan, or an event that changed nothing
                self._pending[candidate.unit] = _Pending(candidate, signature, now, closed)
                return True
            if pending.signature != signature:
                pending.signature, pending.since, pending.closed = signature, now, closed
            else:
                pending.closed = pending.closed or closed
            pending.candidate = candidate
            return closed

    def forget(self, unit: Path) -> None:
        with self._lock:
            self._pending.pop(unit, None)

    def take(self, now: float, room: int, busy: set[Path]) -> list[Job]:
        """Up to `room` complete units, oldest first, skipping those queued or converting."""
        jobs: list[Job] = []
        with self._lock:
            for unit, p in list(self._pending.items()):
                if len(jobs) >= room:
                    break
                if unit in busy or not (p.closed or now - p.since >= self.quiet_seconds):
                    continue
                signature = p.candidate.signature()  # still as it was? (events can be lost)
                if signature is None:
                    del self._pending[unit]
                elif signature != p.signature:
                    p.signature, p.since, p.closed = signature, now, False
                else:
                    del self._pending[unit]
                    if self._done.get(str(unit)) != signature:
                        jobs.append(Job(unit, signature))
        return jobs

    def next_due(self, busy: set[Path]) -> float | None:
        """When the next pending unit completes if nothing changes (monotonic), or None."""
        with self._lock:
            times = [p.since + (0 if p.closed else self.quiet_seconds)
                     for unit, p in self._pending.items() if unit not in busy]
        return min(times, default=None)

    def finish(self, job: Job) -> None:
        """`job` is dealt with (converted, or failed for good): do not take it again unchanged."""
        with self._lock:
            self._done[str(job.path)] = job.signature
            self._done_changed = True

    def keep_done(self, present: set[str]) -> None:
        """After a full scan: forget what was finished for files that are gone.

        A file the scan did not see may have arrived (and been finished) behind it: only
        what no longer exists now is forgotten.
        """
        with self._lock:
            gone = [k for k in self._done if k not in present and not os.path.lexists(k)]
            for k in gone:
                del self._done[k]
            self._done_changed = self._done_changed or bool(gone)

    def done_if_changed(self) -> dict[str, Signature] | None:
        """A copy of what was finished, when it changed since the last call (to save it)."""
        with self._lock:
            if not self._done_changed:
                return None
            self._done_changed = False
            return dict(self._done)

    @property
    def waiting(self) -> int:
        """Units seen whose writer may not be done yet, or that wait for room in the queue."""
        with self._lock:
            return len(self._pending)
