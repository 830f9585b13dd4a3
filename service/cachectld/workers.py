"""Conversions in worker processes, so no file can take the daemon down.

Each worker is a spawned process (no state forked from the daemon's threads) that loads
cachectl once and runs one Cache.add at a time. A worker that crashes (a segfault in a
loader, os._exit, the OOM killer), runs past task_timeout_seconds or out of its memory
limit fails only the file it held; the pool starts another.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import multiprocessing
import os
import resource
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from cachectl.errors import CachectlError, NoSpaceError

from . import logs
from .config import Config
from .status import Result, Worker
from .tracker import Job

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
MAX_BACKOFF = 60.0  # seconds between two attempts to start a worker that keeps dying
RETIRE_SECONDS = 10.0
NO_SPACE_RETRY = 15.0  # seconds before a file that met a full store disk is tried again  # an idle worker told to exit gets this long before it is killed


# -- in the worker process ---------------------------------------------------------------


def serve(conn: Connection, root: str, memory_limit_mb: int, parent: int, log_level: int) -> None:
    """A worker: convert what the daemon sends, one job at a time, until it sends None."""
    logs.setup(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the daemon's to handle
    # die with the daemon even when it is SIGKILLed (the kernel sends us SIGKILL)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return
    os.setpgrp()  # a group of our own: a timeout kills our environment helpers with us
    from cachectl.cache import Cache

    with Cache(root) as cache:
        # start each environment's timm now, not inside the first file's deadline
        for env in cache.environments():
            try:
                cache.target(env).info()
            except CachectlError as exc:  # its conversions fail, each with this reason; the rest go on
                log.warning("environment %s does not start: %s", env.name, exc)
        if memory_limit_mb:
            _limit_memory(memory_limit_mb)
        conn.send(os.getpid())
        while (job := conn.recv()) is not None:
            started = time.monotonic()
            try:
                conn.send(_convert(cache, job, started, memory_limit_mb))
            except MemoryError:
                conn.send(_result(job, started, ok=False, error=(
                    "ran out of memory: converting it needs more than memory_limit_mb = %d. "
                    "Raise memory_limit_mb in cachectld.toml, then touch the file." % memory_limit_mb)))
                return  # what half-allocated state is left is not worth keeping


def _limit_memory(mb: int) -> None:
    # RLIMIT_AS counts address space, and torch with its libraries already maps ~3.6 GB
    # before any work: the limit is what a conversion may add to that.
    with open("/proc/self/status") as f:
        base_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    limit = base_kb * 1024 + mb * 1024 * 1024
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY:  # a LimitAS= of the unit stays the ceiling
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _convert(cache, job: Job, started: float, memory_limit_mb: int) -> Result:
    try:
        added = cache.add(job.path)
    except NoSpaceError as exc:  # the store's disk, not the file: the daemon tries again later
        return _result(job, started, ok=False, error=str(exc), again_in=NO_SPACE_RETRY)
    except CachectlError as exc:
        error = str(exc)
        if memory_limit_mb and os.strerror(errno.ENOMEM) in error:  # a refused mmap, reported as a bad file
            error = "ran out of memory (memory_limit_mb = %d: raise it in cachectld.toml, then touch the file): %s" % (
                memory_limit_mb, error)
        return _result(job, started, ok=False, error=error)
    except MemoryError:
        raise  # the worker's own end: see serve
    except OSError as exc:  # unreadable (permissions), vanished while read, or the store's disk is full
        return _result(job, started, ok=False, error=(
            "%s: %s. Check that the daemon's user can read it and that the store's disk has room, "
            "then touch the file." % (exc.filename or job.path, exc.strerror)))
    except Exception as exc:  # a bug in cachectl: recorded for this file, with the traceback in the log
        log.error("converting %s failed unexpectedly:\n%s", job.path, traceback.format_exc())
        return _result(job, started, ok=False, error="cachectl failed unexpectedly (%s: %s); the daemon's "
                                                     "log has the traceback" % (type(exc).__name__, exc))
    errors = ["%s: %s" % (link.env, link.error) for link in added.links if link.error]
    return _result(job, started, ok=not errors, version=added.version.ref, new_version=added.new_version,
                   error="; ".join(errors) or None)


def _result(job: Job, started: float, **kw) -> Result:
    return Result(path=str(job.path), size=job.signature[0], mtime_ns=job.signature[1],
                  finished=time.time(), seconds=round(time.monotonic() - started, 3), **kw)


# -- in the daemon ---------------------------------------------------------------------------


@dataclass
class _Slot:  # private and mutable: one worker process as the pool sees it
    process: multiprocessing.process.BaseProcess
    conn: Connection
    memory_limit_mb: int
    pid: int | None = None  # set by the worker's hello: it is ready
    job: Job | None = None
    started: float = 0.0  # monotonic, when `job` was sent
    started_wall: float = 0.0


class Pool:
    def __init__(self, cfg: Config):
        self._context = multiprocessing.get_context("spawn")
        self._slots: list[_Slot] = []
        self._retiring: list[multiprocessing.process.BaseProcess] = []  # told to exit, not yet gone
        self._backoff = 1.0
        self._start_after = 0.0
        self._returned: list[Job] = []  # sent to a worker that exited before taking it
        self.cfg = cfg

    # -- starting and stopping workers

    def fill(self, now: float) -> None:
        """Start or retire workers until there are cfg.workers with the current memory limit."""
        for slot in [s for s in self._slots if s.job is None and s.memory_limit_mb != self.cfg.memory_limit_mb]:
            self._retire(slot)
        while len(self._slots) > self.cfg.workers and any(s.job is None for s in self._slots):
            self._retire(next(s for s in reversed(self._slots) if s.job is None))
        while len(self._slots) < self.cfg.workers and now >= self._start_after:
            ours, theirs = self._context.Pipe()
            process = self._context.Process(
                target=serve, name="cachectld-worker",
                args=(theirs, str(self.cfg.root), self.cfg.memory_limit_mb, os.getpid(), logging.getLogger().level),
            )
            process.start()
            theirs.close()
            self._slots.append(_Slot(process, ours, self.cfg.memory_limit_mb))

    def _retire(self, slot: _Slot) -> None:
        """Tell a worker without a job to exit; it is reaped later, without waiting for it here."""
        if slot.pid is None:
            _kill(slot.process)  # still starting: it holds nothing worth a clean exit
        else:
            try:
                slot.conn.send(None)
            except OSError:
                pass  # already gone: reaped like the others
        slot.conn.close()
        self._slots.remove(slot)
        self._retiring.append(slot.process)

    # -- work

    @property
    def busy_count(self) -> int:
        return sum(1 for s in self._slots if s.job is not None)

    def busy(self) -> set[Path]:
        return {s.job.path for s in self._slots if s.job is not None}

    def idle(self) -> list[_Slot]:
        return [s for s in self._slots if s.pid is not None and s.job is None]

    def dispatch(self, slot: _Slot, job: Job, now: float) -> bool:
        """Send `job` to an idle worker; False if the worker is gone (collect reaps it)."""
        try:
            slot.conn.send(job)
        except OSError:  # it died since the last collect: not the file's fault
            return False
        slot.job, slot.started, slot.started_wall = job, now, time.time()
        return True

    def waitables(self) -> list:
        return [s.conn for s in self._slots] + [p.sentinel for p in self._retiring] + \
            [s.process.sentinel for s in self._slots]

    def next_deadline(self) -> float | None:
        times = [s.started + self.cfg.task_timeout_seconds for s in self._slots if s.job is not None]
        if len(self._slots) < self.cfg.workers:
            times.append(self._start_after)
        return min(times, default=None)

    def collect(self, now: float) -> list[Result]:
        """Results that arrived, and failures of workers that died or ran out of time."""
        self._retiring = [p for p in self._retiring if p.is_alive()]  # is_alive reaps the exited
        results = []
        for slot in list(self._slots):
            while True:
                try:
                    if not slot.conn.poll():
                        break
                    message = slot.conn.recv()
                except (EOFError, OSError):
                    break  # the pipe broke with the worker: a death, handled below
                if isinstance(message, int):
                    slot.pid, self._backoff = message, 1.0
                else:
                    results.append(message)
                    slot.job = None
            if slot.job is not None and now - slot.started > self.cfg.task_timeout_seconds:
                results.append(self._failed(slot, "took longer than task_timeout_seconds = %g; raise it in "
                                                  "cachectld.toml if files this large are expected, then touch "
                                                  "the file" % self.cfg.task_timeout_seconds))
                _kill(slot.process)
                self._forget(slot)
            elif not slot.process.is_alive():
                results += self._died(slot, now)
        return results

    def _forget(self, slot: _Slot) -> None:
        slot.process.join()
        slot.conn.close()
        self._slots.remove(slot)

    def _died(self, slot: _Slot, now: float) -> list[Result]:
        code = slot.process.exitcode
        how = ("was killed by %s" % signal.Signals(-code).name) if code < 0 else "exited with code %d" % code
        self._forget(slot)
        if slot.job is not None and code == 0:
            # a worker exits by itself only between jobs (after running out of memory): this
            # one was sent as it left and never started, so it is not the file's failure
            self._returned.append(slot.job)
            log.warning("worker %s exited before taking %s; it is sent to another", slot.pid, slot.job.path)
        elif slot.job is not None:
            hint = " (the kernel's OOM killer? see the journal)" if code == -signal.SIGKILL else ""
            return [self._failed(slot, "the worker converting it %s%s; the file may be damaged or hostile: "
                                       "check it with cachectl inspect; it is taken again at the next start"
                                 % (how, hint), retry=True)]
        if slot.pid is None:  # died before it was ready: a broken install, or a limit too small
            self._start_after = now + self._backoff
            log.error("a worker %s while starting; trying again in %.0f s", how, self._backoff)
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
        else:
            log.warning("worker %d %s; starting another", slot.pid, how)
        return []

    def _failed(self, slot: _Slot, why: str, retry: bool = False) -> Result:
        return _result(slot.job, slot.started, ok=False, error=why, retry=retry)

    def returned(self) -> list[Job]:
        """Jobs to queue again, first: their worker left before taking them."""
        jobs, self._returned = self._returned, []
        return jobs

    def describe(self) -> tuple[Worker, ...]:
        return tuple(
            Worker(pid=s.process.pid, state="starting" if s.pid is None else "converting" if s.job else "idle",
                   path=str(s.job.path) if s.job else None, since=s.started_wall if s.job else None)
            for s in self._slots
        )

    def stop(self, grace: float, tick: Callable[[float], bool]) -> list[Result]:
        """Let conversions in flight finish for up to `grace` seconds, then kill what is left.

        `tick(timeout)` waits up to `timeout` for something to happen and says whether to
        give up waiting. What is killed here is not a failure of its file: it is taken
        again at the next start.
        """
        results = []
        end = time.monotonic() + grace
        while True:
            for slot in [s for s in self._slots if s.job is None]:
                self._retire(slot)
            if not self._slots or time.monotonic() >= end or tick(min(1.0, end - time.monotonic())):
                break
            results += self.collect(time.monotonic())
        for slot in list(self._slots):
            log.warning("stopped before %s was converted; it is taken again at the next start", slot.job.path)
            _kill(slot.process)
            self._forget(slot)
        for process in self._retiring:  # idle workers closing their environments' helpers
            process.join(timeout=max(RETIRE_SECONDS, end - time.monotonic()))
            if process.is_alive():
                _kill(process)
                process.join()
        self._retiring = []
        return results


def _kill(process: multiprocessing.process.BaseProcess) -> None:
    # Only called on a worker not yet reaped, so its pid (and group id) cannot be reused yet.
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the worker and its environment helpers
    except ProcessLookupError:
        pass  # not yet in a group of its own: the process alone, below
    process.kill()
