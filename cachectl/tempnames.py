"""Temporary files' names, and whether the process writing one still lives.

Every write goes to a hidden temporary beside its destination and is renamed into place
when complete. The temporary's name says who writes it:

    .<name>@<host>.pid<pid>.<random>.tmp

so whatever removes the leftovers of interrupted writes (`cachectl prune`, a view's
update) tells them from writes in progress, also on a store that several hosts share
over NFS:

- a writer on this host lives while its pid does (and, where its start time is known,
  while that pid is still the same process);
- a writer on another host cannot be asked: it holds a lease, alive while its file was
  modified less than LEASE_SECONDS ago. A writer modifies its file as it writes, so only
  a write that stalls that long, or a clock that far off, could lose its file.

Names written by older cachectl (`.<name>.pid<pid>[.<anything>].tmp`, no host) are read
as this host's: a store written before hosts were named was written by one host.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

SUFFIX = ".tmp"
# Long enough for the slowest write between two modifications of its file (a 2.5 GB
# safetensors flushed by fsync over a slow NFS link takes minutes, not an hour) and for
# the clocks of two hosts to disagree by minutes.
LEASE_SECONDS = 3600.0

_NAME = re.compile(r"\.(?P<target>.+)@(?P<host>[A-Za-z0-9._-]+)\.pid(?P<pid>\d+)\.[0-9a-f]+%s" % re.escape(SUFFIX))
_OLD_PID = re.compile(r"\.pid(\d+)\.")


@dataclass(frozen=True)
class TempName:
    """What a temporary's name says of it."""

    target: str  # the name it is renamed to, or what it is for (ingest, new)
    host: str | None  # None: a name from before hosts were named, read as this host's
    pid: int

    @property
    def local(self) -> bool:
        return self.host is None or self.host == this_host()


def this_host() -> str:
    """This host's name as temporaries carry it: letters, digits, `.`, `-` and `_` only."""
    import socket  # here: a command that writes nothing never needs it

    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def temp_name(target: str) -> str:
    """A hidden name for a temporary that becomes `target`: this host, this process, and a
    random part no one can guess (a link planted in advance is never written through)."""
    return ".%s@%s.pid%d.%s%s" % (target, this_host(), os.getpid(), os.urandom(6).hex(), SUFFIX)


def temp_path(path: Path) -> Path:
    """A temporary beside `path`, to be renamed over it."""
    return path.with_name(temp_name(path.name))


def parse(name: str) -> TempName | None:
    """What the temporary `name` says of its writer; None if it names none."""
    if m := _NAME.fullmatch(name):
        return TempName(m.group("target"), m.group("host"), int(m.group("pid")))
    if name.startswith(".") and name.endswith(SUFFIX) and (m := _OLD_PID.search(name)):
        return TempName(name[1:m.start()], None, int(m.group(1)))
    return None


def writer_alive(path: Path, now: float | None = None, lease: float = LEASE_SECONDS) -> bool:
    """Whether the temporary at `path` may still be written to: then it is not a leftover.

    A temporary that names no writer is a leftover; one that is gone is nobody's."""
    name = parse(path.name)
    if name is None:
        return False
    if name.local:
        return pid_alive(name.pid)
    try:
        modified = path.lstat().st_mtime
    except FileNotFoundError:
        return False
    return (time.time() if now is None else now) - modified < lease


def pid_alive(pid: int, ticks: int | None = None) -> bool:
    """Whether process `pid` of this host lives; given `ticks` (its start, from
    process_ticks), whether it is still that process and not another given its pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        pass
    return ticks is None or process_ticks(pid) == ticks


def process_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux); None where unknown."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
