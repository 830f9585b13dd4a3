"""Which locks a store takes: the kernel's (flock) where its filesystem keeps them between
every process that uses the store, lock files (soft) where it does not.

flock on NFS is forwarded to the server only when the mount sends locks there
(`local_lock=none`); mounted `nolock` (`local_lock=all`) it stays on one client, and
CIFS, FUSE filesystems (sshfs, gcsfuse, ...) and Lustre without `flock` keep it local or
refuse it. A lock that other hosts do not see is no lock, so those get soft locks. The
choice is read from the store's mount; CACHECTL_LOCKS=kernel|soft overrides it.

Kernel locks are taken with flock(2) here, not through filelock: its FileLock spends 0.1 to
0.2 ms of Python bookkeeping per lock (fork tracking, a singleton registry, polling), the
largest part of a linked conversion's cost, for nothing a flock on a fresh descriptor lacks.
filelock keeps the soft leases, where its stale-holder logic is the point.
"""
from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import CachectlError

KINDS = ("kernel", "soft")
MOUNTINFO = Path("/proc/self/mountinfo")
_LOCAL_ONLY = ("cifs", "smb3", "smbfs", "9p", "ceph")  # flock local to one client, or refused


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    options: frozenset[str]  # mount and superblock options together


@dataclass(frozen=True)
class LockChoice:
    kind: str  # kernel | soft
    why: str  # what decided it, for `cachectl status` and error messages


class Busy(Exception):
    """The lock is held by someone else and the caller would not wait."""


# flock refused by the filesystem, not contended: the caller falls back to a soft lock
_UNSUPPORTED = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL)


def flock(path: Path, mode: int, wait: bool = True) -> int | None:
    """A descriptor of the lock file `path` holding its exclusive kernel lock (close it to
    release; it goes with its process too); None where the filesystem refuses flock. Taken
    already and `wait` false: Busy. A lock file made here gets `mode` whatever the umask, so
    every member of a shared store's group can take it."""
    flags = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, mode)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY | flags)  # someone else's: flock needs no write access
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and st.st_mode & 0o777 != mode:
            try:
                os.fchmod(fd, mode)
            except PermissionError:
                pass  # systemd's sandbox may refuse some bits; the umask decided them
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(str(path)) from None
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                os.close(fd)
                return None
            raise
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
    return fd


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounts(text: str) -> list[Mount]:
    """The mounts of a /proc/<pid>/mountinfo text."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 3:
            continue
        options = frozenset(fields[5].split(",")) | frozenset(tail[2].split(","))
        out.append(Mount(_unescape(fields[4]), tail[0], options))
    return out


def mount_of(path: Path, table: list[Mount]) -> Mount | None:
    """The mount `path` lives on: the last-mounted of the longest matching mount points."""
    path = _existing(path)
    best = None
    for m in table:
        point = m.point.rstrip("/") or "/"
        if path == Path(point) or point == "/" or str(path).startswith(point + "/"):
            if best is None or len(point) >= len(best.point.rstrip("/") or "/"):
                best = m
    return best


def _existing(path: Path) -> Path:
    """`path` with the symlinks of its existing part resolved: a store not made yet is
    judged by the folder it will be made in."""
    path, rest = Path(os.path.abspath(path)), []
    while not path.exists() and path != path.parent:
        rest.append(path.name)
        path = path.parent
    return path.resolve().joinpath(*reversed(rest))


def kind_for(mount: Mount | None) -> LockChoice:
    if mount is None:
        return LockChoice("kernel", "no mount found for it")
    fs, opts = mount.fstype, mount.options
    where = "%s mount at %s" % (fs, mount.point)
    if fs in ("nfs", "nfs4"):
        if "local_lock=none" in opts:
            return LockChoice("kernel", where + " sends locks to its server")
        return LockChoice("soft", where + " keeps flock on this client (nolock or local_lock)")
    if fs == "lustre":
        if "flock" in opts:
            return LockChoice("kernel", where + " mounted with flock")
        return LockChoice("soft", where + " without the flock option")
    if fs.startswith("fuse.") or fs == "fuse" or fs in _LOCAL_ONLY:
        return LockChoice("soft", where + ": flock there does not reach other clients")
    return LockChoice("kernel", where)


def choose(path: Path, environ: Mapping[str, str] = os.environ, mountinfo: Path = MOUNTINFO) -> LockChoice:
    """The locks a store at `path` takes: CACHECTL_LOCKS, else what its mount supports."""
    wanted = environ.get("CACHECTL_LOCKS")
    if wanted:
        if wanted not in KINDS:
            raise CachectlError(None, "CACHECTL_LOCKS=%s is neither kernel nor soft" % wanted,
                                "Set it to kernel or soft, or unset it to let the store's mount decide.")
        return LockChoice(wanted, "CACHECTL_LOCKS=%s" % wanted)
    try:
        table = mounts(mountinfo.read_text())
    except OSError:
        return LockChoice("kernel", "%s is unreadable" % mountinfo)
    return kind_for(mount_of(path, table))
