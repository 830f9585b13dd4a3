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


# A closed file is taken once it stayed unchanged this long (at most quiet_seconds): a
# writer that closes after every append has opened it again by then.
CLOSE_SETTLE = 1.0


@dataclass
class _Pending:  # private and mutable: updated in place under the tracker's lock
    candidate: Candidate
    signature: Signature
    since: float  # when the signature last changed (monotonic)
    closed: bool  # the writer closed it, or renamed it into place, at this signature
    appending: bool = False  # it changed after a close: only quiet_seconds of quiet complete it


class Tracker:
    def __init__(self, quiet_seconds: float, done: dict[str, Signature] | None = None):
        self.quiet_seconds = quiet_seconds
        self._lock = threading.Lock()
        self._pending: dict[Path, _Pending] = {}
        self._done: dict[str, Signature] = dict(done or {})
        self._done_changed = False
        # failed because the worker holding it died: not taken again unchanged until a restart
        self._failed_now: dict[str, Signature] = {}

    def observe(self, candidate: Candidate, closed: bool, now: float) -> bool:
        """Note an event or a scan hit. True when the main loop should look before it planned to."""
        signature = candidate.signature()
        with self._lock:
            pending = self._pending.get(candidate.unit)
            if signature is None:
                self._pending.pop(candidate.unit, None)
                return False
            if pending is None:
                if signature in (self._done.get(str(candidate.unit)), self._failed_now.get(str(candidate.unit))):
                    return False  # a rescan, or an event that changed nothing
                self._pending[candidate.unit] = _Pending(candidate, signature, now, closed)
                return True
            if pending.signature != signature:
                pending.appending = pending.appending or pending.closed
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
                if unit in busy or now - p.since < self._settle(p):
                    continue
                signature = p.candidate.signature()  # still as it was? (events can be lost)
                if signature is None:
                    del self._pending[unit]
                elif signature != p.signature:
                    p.signature, p.since, p.closed = signature, now, False
                else:
                    del self._pending[unit]
                    if signature not in (self._done.get(str(unit)), self._failed_now.get(str(unit))):
                        jobs.append(Job(unit, signature))
        return jobs

    def next_due(self, busy: set[Path]) -> float | None:
        """When the next pending unit completes if nothing changes (monotonic), or None."""
        with self._lock:
            times = [p.since + self._settle(p) for unit, p in self._pending.items() if unit not in busy]
        return min(times, default=None)

    def _settle(self, p: _Pending) -> float:
        """How long `p` must stay unchanged to be complete."""
        if p.closed and not p.appending:
            return min(CLOSE_SETTLE, self.quiet_seconds)
        return self.quiet_seconds

    def finish(self, job: Job, lasting: bool = True) -> None:
        """`job` is dealt with (converted, or failed for good): do not take it again unchanged.
        Not `lasting`: not again while this daemon runs, but again after a restart."""
        with self._lock:
            if lasting:
                self._done[str(job.path)] = job.signature
                self._done_changed = True
            else:
                self._failed_now[str(job.path)] = job.signature

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
