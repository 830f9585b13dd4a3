"""watchdog observers on the watched folders, and a scanner thread: both feed the tracker.

inotify where it sees every write; polling on network filesystems (or when told, or when
inotify's limits are reached). The scanner walks every folder once at start (after the
observers are running, so nothing falls between the two), then every rescan_seconds, and
any folder that appears or moves in; what it finds that was already done is skipped.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable

from watchdog.events import (
    DirCreatedEvent, DirMovedEvent, FileAttribEvent, FileClosedEvent, FileCreatedEvent, FileDeletedEvent,
    FileModifiedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from .candidates import candidates
from .config import Config, Watch, watches
from .tracker import Tracker

log = logging.getLogger(__name__)

# Opens, reads and closes without writing (our own workers reading a file) are not asked for.
# Attribute changes are: a new mtime alone (os.utime, rsync -t) is a change of signature.
EVENTS = [FileCreatedEvent, FileModifiedEvent, FileAttribEvent, FileClosedEvent, FileMovedEvent, FileDeletedEvent,
          DirCreatedEvent, DirMovedEvent]


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: "Watcher", top: Path):
        self.watcher, self.top = watcher, top

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = Path(os.fsdecode(event.dest_path or event.src_path))
        if event.is_directory:  # a folder created or moved in: its files may predate the watch
            self.watcher.request_scan(path)
        elif event.event_type == "deleted":
            for c in candidates(path, self.top, self.watcher.excluded):
                self.watcher.tracker.forget(c.unit)
        else:
            # a close after writing, or a rename into place (rsync): the writer is done
            closed = event.event_type in ("closed", "moved")
            self.watcher.observe(path, self.top, closed)


class Watcher:
    def __init__(self, tracker: Tracker, excluded: tuple[Path, ...], wake: Callable[[], None]):
        self.tracker = tracker
        self.excluded = excluded
        self.wake = wake
        self.scanned = threading.Event()  # the first full scan is done
        self.last_scan: float | None = None  # time.time() the last full scan ended
        self.watches: tuple[Watch, ...] = ()
        self._observers: list[BaseObserver] = []
        self._requests: queue.Queue[Path | None] = queue.Queue()
        self._scanner: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self, cfg: Config) -> tuple[Watch, ...]:
        """Observe cfg.watch (inotify or polling, per folder), then scan it all."""
        self._stopping.clear()
        self.scanned.clear()
        inotify, polling = Observer(), PollingObserver(timeout=cfg.poll_interval)
        inotify.start()
        polling.start()
        self._observers = [inotify, polling]
        chosen = []
        for w in watches(cfg):
            handler = _Handler(self, w.path)
            if not w.polling:
                try:
                    inotify.schedule(handler, str(w.path), recursive=True, event_filter=EVENTS)
                except OSError as exc:  # ENOSPC: max_user_watches; EMFILE: max_user_instances
                    log.warning("%s: inotify refused it (%s); polling it instead. To watch it with inotify, "
                                "raise fs.inotify.max_user_watches / max_user_instances (sysctl)", w.path, exc)
                    w = dataclasses.replace(w, polling=True, why="inotify refused: %s" % exc.strerror)
            if w.polling:
                polling.schedule(handler, str(w.path), recursive=True, event_filter=EVENTS)
            chosen.append(w)
        self.watches = tuple(chosen)
        self._scanner = threading.Thread(target=self._scan_loop, args=(cfg.rescan_seconds,),
                                         name="cachectld-scanner", daemon=True)
        self._scanner.start()
        return self.watches

    def stop(self) -> None:
        self._stopping.set()
        self._requests.put(None)
        for o in self._observers:
            o.stop()
        for o in self._observers:
            o.join()
        if self._scanner is not None:
            self._scanner.join()
        self._observers, self._scanner = [], None
        self._requests = queue.Queue()

    def healthy(self) -> bool:
        """The observers and the scanner still run (a dead one means missed files)."""
        threads = [*self._observers, self._scanner]
        return bool(self._observers) and all(t is not None and t.is_alive() for t in threads)

    def request_scan(self, folder: Path) -> None:
        self._requests.put(folder)

    def observe(self, path: Path, top: Path, closed: bool) -> None:
        now = time.monotonic()
        for c in candidates(path, top, self.excluded):
            if self.tracker.observe(c, closed, now):
                self.wake()

    # -- scanning

    def _scan_loop(self, every: float) -> None:
        self._scan_all()
        self.scanned.set()
        self.wake()
        next_full = time.monotonic() + every
        while not self._stopping.is_set():
            try:
                folder = self._requests.get(timeout=max(0.0, next_full - time.monotonic()))
            except queue.Empty:
                self._scan_all()
                next_full = time.monotonic() + every
                continue
            if folder is not None:
                top = next((w.path for w in self.watches if w.path == folder or w.path in folder.parents), None)
                if top is not None:
                    self._scan(folder, top, set())
                    self.wake()

    def _scan_all(self) -> None:
        present: set[str] = set()
        complete = True
        for w in self.watches:
            if not w.path.is_dir():
                log.error("%s: the watched folder is gone (unmounted?); nothing in it is taken until it is back",
                          w.path)
                complete = False
                continue
            self._scan(w.path, w.path, present)
        if complete and not self._stopping.is_set():
            self.tracker.keep_done(present)
            self.last_scan = time.time()
        self.wake()

    def _scan(self, folder: Path, top: Path, present: set[str]) -> None:
        def unreadable(exc: OSError) -> None:
            log.warning("%s: cannot list it (%s); files in it are not taken", exc.filename, exc.strerror)

        for here, dirs, files in os.walk(folder, onerror=unreadable):
            if self._stopping.is_set():
                return
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # rsync's and the hub's hidden folders
            for name in files:
                path = Path(here, name)
                for c in candidates(path, top, self.excluded):
                    present.add(str(c.unit))
                    self.tracker.observe(c, False, time.monotonic())
