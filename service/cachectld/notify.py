"""systemd's notify protocol (sd_notify): datagrams of KEY=VALUE lines to $NOTIFY_SOCKET.

Without $NOTIFY_SOCKET (not started by systemd, or Type=simple) every call is a no-op.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import MutableMapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: MutableMapping[str, str] = os.environ):
        # Taken out of the environment: workers and environment helpers must not speak for us.
        address = environ.pop("NOTIFY_SOCKET", "")
        usec = environ.pop("WATCHDOG_USEC", "")
        pid = environ.pop("WATCHDOG_PID", "")
        # a leading '@' names a socket in the abstract namespace
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if address else None
        self.watchdog_every: float | None = None  # seconds between two WATCHDOG=1
        if usec and (not pid or pid == str(os.getpid())):
            try:
                self.watchdog_every = int(usec) / 2e6  # half the interval, as sd_watchdog_enabled advises
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        self._failed = False

    def send(self, *fields: str) -> None:
        """Send `fields` ("READY=1", "STATUS=...") in one datagram."""
        if self.socket is None:
            return
        try:
            self.socket.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._failed:  # once: a manager that went away should not flood the log
                log.warning("cannot notify systemd at %s (%s)", self.address.replace("\0", "@"), exc)
            self._failed = True

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
