"""Log lines for a terminal, or for journald when systemd runs us (it stamps the time itself)."""
from __future__ import annotations

import logging
import os
import sys

# journald reads a "<N>" prefix as the line's priority (sd-daemon(3))
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return "<%d>%s" % (_PRIORITY.get(record.levelno, 6), super().format(record))


def setup(level: int) -> None:
    """Log to stderr; called by the daemon and by each worker process."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("watchdog").setLevel(max(level, logging.WARNING))  # its debug lines are per event
