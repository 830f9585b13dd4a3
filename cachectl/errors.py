"""Errors a user can act on: each names the file and says what to do."""
from __future__ import annotations

from pathlib import Path


class CachectlError(Exception):
    """A problem with the user's input or setup, not a bug in cachectl."""

    def __init__(self, subject: str | Path | None, problem: str, fix: str = ""):
        self.subject = str(subject) if subject is not None else None
        self.problem = problem
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        head = "%s: %s" % (self.subject, self.problem) if self.subject else self.problem
        return printable("%s. %s" % (head.rstrip("."), self.fix) if self.fix else head)


# what a file name may hold that would break the one line or drive the terminal: control
# characters (newline, escape, bell) and the bidirectional overrides that reorder text
_UNPRINTABLE = {c: "\\x%02x" % c for c in (*range(32), 127)}
_UNPRINTABLE.update({c: "\\u%04x" % c for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))})


def printable(text: str) -> str:
    """`text` as one line that prints as it reads: control characters written as escapes."""
    return text.translate(_UNPRINTABLE)


class NoSpaceError(CachectlError):
    """The store's disk is full: not the input's fault; the same work succeeds once there is room."""


class CheckpointError(CachectlError):
    """The file is not a checkpoint cachectl can read safely."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle needs classes that only arbitrary code execution could rebuild."""


class IdentifyError(CachectlError):
    """No catalogued architecture matches the checkpoint."""


class NoPlanError(CachectlError):
    """No known way to turn the source layout into the target's."""


class TargetError(CachectlError):
    """The target interpreter cannot answer (missing timm, unknown model, crash)."""


class AmbiguousError(IdentifyError):
    """Look-alike architectures that may compute differently, and nothing in the file decides."""


def few(items, limit: int) -> str:
    """The first `limit` of `items`, and how many more there are: how messages list keys."""
    items = list(items)
    return ", ".join(items[:limit]) + (" and %d more" % (len(items) - limit) if len(items) > limit else "")
