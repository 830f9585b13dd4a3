"""Open what a user names only if it is a regular file, without blocking and without
following a link planted in its place. Needs no torch: the store uses it too."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import CheckpointError


def open_regular(path: Path) -> int:
    """A read-only descriptor of `path` if it is a regular file, else CheckpointError.

    Links are resolved first and the result is opened with O_NOFOLLOW | O_NONBLOCK, and
    only then is the type checked: a FIFO, a socket or a device would block or never end."""
    real = os.path.realpath(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ELOOP, errno.EOPNOTSUPP):  # a socket, a loop of links
            raise CheckpointError(path, "is not a regular file", "Give a checkpoint file.")
        raise CheckpointError(path, "cannot be opened (%s)" % exc.strerror,
                              "Check that it exists and that you may read it.")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(path, "is not a regular file (a FIFO, a socket, a device or a folder)",
                              "Give a checkpoint file.")
    os.set_blocking(fd, True)  # a regular file: plain reads from here on
    return fd
