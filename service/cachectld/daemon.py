"""The daemon's loop: complete files from the tracker, through a bounded queue, to the workers.

One thread (this one) owns the queue, the pool, the status file and systemd; watchdog's
threads and the scanner only report into the tracker and wake this loop through a pipe,
which also carries signals (signal.set_wakeup_fd), so the loop sleeps until something
happens or a timer is due.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable

from cachectl.errors import CachectlError
from cachectl.store import Store
from cachectl.tempnames import process_ticks

from .config import Config, ConfigError
from .notify import Notifier
from .status import WRITE_EVERY, History, Result, Status, read_status, status_path, write_status
from .tracker import Job, Tracker
from .watcher import Watcher
from .workers import Pool

log = logging.getLogger(__name__)

SEEN_NAME = "cachectld.seen.json"  # what was done, by path+size+mtime: survives a restart
STATUS_AT_MOST_EVERY = 0.5  # seconds: a burst of results is one write, not fifty


class Daemon:
    def __init__(self, cfg: Config, reload: Callable[[], Config], notifier: Notifier):
        self.cfg = cfg
        self._load_config = reload
        self.notifier = notifier
        self.store = Store(cfg.root).init()
        # held while this daemon lives, released by the kernel when it dies (even by SIGKILL):
        # two daemons started at one moment cannot both pass, and a stale status blocks none
        self._alone = contextlib.ExitStack()
        try:
            self._alone.enter_context(self.store.lock("cachectld", wait=False))
        except CachectlError:
            previous = self._previous()
            who = " (pid %d on %s)" % (previous.pid, previous.host) if previous and previous.pid != os.getpid() else ""
            raise CachectlError(status_path(self.store.root), "another cachectld%s runs on this store" % who,
                                "Stop it first (systemctl stop cachectld), or give this one another CACHECTL_ROOT.")
        self.started = time.time()
        self.queue: deque[Job] = deque()
        self.tracker = Tracker(cfg.quiet_seconds, done=self._load_seen())
        self.history = History(self._previous())
        self.pool = Pool(cfg)
        # the store's own folders are never inputs, even if a watched folder holds them
        self.watcher = Watcher(self.tracker, (self.store.base, self.store.root / "views"), self._wake)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop = self._stop_now = self._reload = False
        self._ready = False
        self._dirty = True
        self._last_write = self._last_ping = 0.0
        self._last_status = ""
        self._later: list[tuple[float, Job]] = []  # (monotonic time, job): to try again then (a full disk)

    # -- start-up

    def _previous(self) -> Status | None:
        """What the last daemon on this store wrote (its history is carried on), if anything."""
        try:
            previous = read_status(self.store.root)
        except CachectlError as exc:
            log.warning("%s; starting with an empty history", exc)
            return None
        return previous

    def _load_seen(self) -> dict:
        try:
            raw = self.store.read_json(self.store.root / SEEN_NAME) or {}
        except CachectlError as exc:
            log.warning("%s; every file is looked at again (by content, so nothing is stored twice)", exc)
            return {}
        return {path: tuple(sig) for path, sig in raw.get("done", {}).items()}

    def _prepare(self, cfg: Config) -> None:
        """The default inbox is created if missing; any other watched folder must exist."""
        missing = [p for p in cfg.watch if not p.is_dir() and p != self.store.inbox]
        if missing:
            raise ConfigError(missing[0], "the folder to watch does not exist",
                              "Create it, or fix watch in %s / --watch / $CACHECTL_WATCH." % (cfg.file or "cachectld.toml"))
        if self.store.inbox in cfg.watch:
            self.store.inbox.mkdir(parents=True, exist_ok=True)

    # -- the loop

    def run(self) -> int:
        self._prepare(self.cfg)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        self.pool.fill(time.monotonic())
        self._started(self.watcher.start(self.cfg))
        while not self._stop:
            now = time.monotonic()
            if self._reload:
                self._reload = False
                self._apply_reload()
            if not self._ready and self.watcher.scanned.is_set():
                self._ready = True
                self.notifier.send("READY=1", "STATUS=" + self._summary())
                log.info("start-up scan done: %d queued, %d waiting for writers", len(self.queue), self.tracker.waiting)
            self._step(now)
            self._heartbeat(now)
            self._sleep(self._next_wake(now))
        return self._shutdown()

    def _step(self, now: float) -> None:
        for result in self.pool.collect(now):
            self._record(result)
        self.queue.extendleft(self.pool.returned())  # sent to a worker that was already leaving
        due = [job for when, job in self._later if when <= now]
        if due:
            self._later = [(when, job) for when, job in self._later if when > now]
            self.queue.extend(due)
        self.pool.fill(now)
        room = self.cfg.queue_size - len(self.queue)
        if room > 0:
            self.queue.extend(self.tracker.take(now, room, self._busy()))
        for slot in self.pool.idle():
            if not self.queue:
                break
            job = self.queue.popleft()
            if not self.pool.dispatch(slot, job, now):
                self.queue.appendleft(job)
                continue
            log.info("converting %s", job.path)
            self._dirty = True

    def _busy(self) -> set[Path]:
        return self.pool.busy() | {j.path for j in self.queue}

    def _record(self, result: Result) -> None:
        job = Job(Path(result.path), (result.size, result.mtime_ns))
        if result.again_in:
            self._later.append((time.monotonic() + result.again_in, job))
        else:
            self.tracker.finish(job, lasting=not result.retry)
        self.history.add(result)
        self._dirty = True
        if result.ok:
            log.info("%s: %s %s (%.1f s)", result.path, "stored as" if result.new_version else "already stored as",
                     result.version, result.seconds)
        else:
            log.error("%s: failed: %s", result.path, result.error)

    def _next_wake(self, now: float) -> float:
        times = [self._last_write + WRITE_EVERY]
        if self._dirty:
            times.append(self._last_write + STATUS_AT_MOST_EVERY)
        if self.notifier.watchdog_every:
            times.append(self._last_ping + self.notifier.watchdog_every)
        if len(self.queue) < self.cfg.queue_size:
            due = self.tracker.next_due(self._busy())
            if due is not None:
                times.append(due + 0.01)  # just past: due means quiet for at least quiet_seconds
        times += [when for when, _ in self._later]
        deadline = self.pool.next_deadline()
        if deadline is not None:
            times.append(deadline + 0.01)
        return max(0.0, min(times) - now)

    def _sleep(self, timeout: float) -> bool:
        """Wait for a worker, a watcher, a signal or `timeout`; True once told to stop at once."""
        wait([*self.pool.waitables(), self._wake_r], timeout)
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass  # drained
        return self._stop_now

    def _wake(self) -> None:
        """Called from the watchers' threads: look now, not at the next planned time."""
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    # -- signals

    def _on_stop(self, signum: int, frame) -> None:
        self._stop_now = self._stop  # a second SIGTERM / Ctrl-C: do not wait for conversions
        self._stop = True

    def _on_reload(self, signum: int, frame) -> None:
        self._reload = True

    def _apply_reload(self) -> None:
        try:
            cfg = self._load_config()
            self._prepare(cfg)
        except CachectlError as exc:
            log.error("reload refused, the settings stay as they were: %s", exc)
            return
        log.info("reloading settings%s", " from %s" % cfg.file if cfg.file else "")
        self.watcher.stop()
        self.cfg = cfg
        self.tracker.quiet_seconds = cfg.quiet_seconds
        self.pool.cfg = cfg
        self._ready = False  # READY=1 again after the new folders' scan, as systemd expects after RELOADING=1
        self.notifier.send("RELOADING=1", "MONOTONIC_USEC=%d" % (time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6))
        self._started(self.watcher.start(cfg))

    def _started(self, watches) -> None:
        for w in watches:
            log.info("watching %s (%s)", w.path, "polling every %g s, %s" % (self.cfg.poll_interval, w.why)
                     if w.polling else w.why)
        self._dirty = True

    # -- status, systemd

    def _summary(self) -> str:
        last = self.history.recent[-1] if self.history.recent else None
        text = "%d queued, %d waiting for writers, %d converting" % (
            len(self.queue), self.tracker.waiting, self.pool.busy_count)
        if last:
            text += "; last: %s %s" % (Path(last.path).name, last.version if last.ok else "failed")
        return text

    def _status(self, stopped: float | None = None) -> Status:
        return Status(
            pid=os.getpid(), host=socket.gethostname(), started=self.started, updated=time.time(),
            root=str(self.store.root), config=str(self.cfg.file) if self.cfg.file else None,
            watch=self.watcher.watches, workers=self.pool.describe(), queued=len(self.queue),
            waiting=self.tracker.waiting, recent=tuple(self.history.recent), failures=self.history.failures,
            scanned=self.watcher.last_scan, stopped=stopped, ticks=process_ticks(os.getpid()),
        )

    def _heartbeat(self, now: float) -> None:
        if now - self._last_write >= WRITE_EVERY or (self._dirty and now - self._last_write >= STATUS_AT_MOST_EVERY):
            self._write()
            self._last_write, self._dirty = now, False
            summary = self._summary()
            if summary != self._last_status and self._ready:
                self.notifier.send("STATUS=" + summary)
                self._last_status = summary
        if self.notifier.watchdog_every and now - self._last_ping >= self.notifier.watchdog_every:
            if self.watcher.healthy():
                self.notifier.send("WATCHDOG=1")
            else:  # no ping: systemd restarts us, which restarts the dead observer
                log.error("a watcher thread died; not telling systemd all is well")
            self._last_ping = now

    def _write(self, stopped: float | None = None) -> None:
        try:
            write_status(self.store, self._status(stopped))
            done = self.tracker.done_if_changed()
            if done is not None:
                self.store.write_json(self.store.root / SEEN_NAME, {"format": 1, "done": done})
        except OSError as exc:  # a full or read-only disk must not stop the conversions
            log.error("cannot write the status in %s (%s)", self.store.root, exc)

    # -- stop

    def _shutdown(self) -> int:
        self.notifier.send("STOPPING=1", "STATUS=stopping: %d converting" % self.pool.busy_count)
        log.info("stopping: %d converting (up to %g s to finish), %d queued (taken again at the next start)",
                 self.pool.busy_count, self.cfg.stop_grace_seconds, len(self.queue))
        self.watcher.stop()

        def tick(timeout: float) -> bool:
            self._heartbeat(time.monotonic())
            return self._sleep(timeout)

        for result in self.pool.stop(self.cfg.stop_grace_seconds, tick):
            self._record(result)
        self._write(stopped=time.time())
        self._alone.close()
        self.notifier.close()
        log.info("stopped")
        return 0
