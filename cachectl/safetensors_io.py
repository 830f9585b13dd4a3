"""Write safetensors one tensor at a time, atomically (hidden temporary, fsync, rename).

Tensors that are untouched bytes of the source file are copied by the kernel
(copy_file_range) instead of through this process, which is what makes a conversion
cost about what `cp` costs.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Mapping

import torch

from .reader import ST_NAMES

CHUNK = 64 * 1024 * 1024
# Deferred metadata values (hex sha256 digests) are written last over a placeholder of
# the same width, so they can be computed while the data is written.
DEFERRED_WIDTH = 64


def write(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    deferred: Mapping[str, Callable[[], str]] | None = None,
    source: Path | None = None,
    span: Callable[[torch.Tensor], int | None] | None = None,
) -> int:
    """Write `tensors` to `path`; returns the bytes written. Memory: one tensor at a time.

    `span(t)` gives the offset in `source` where t's bytes lie unchanged, or None.
    """
    deferred = deferred or {}
    meta = {**metadata, **{k: "0" * DEFERRED_WIDTH for k in deferred}}
    header: dict = {"__metadata__": meta} if meta else {}
    offset = 0
    order = sorted(tensors)
    for key in order:
        t = tensors[key]
        if t.dtype not in ST_NAMES:
            raise ValueError("%s: dtype %s has no safetensors name" % (key, t.dtype))
        n = t.numel() * t.element_size()
        header[key] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = _header_bytes(header)
    path = Path(path)
    tmp = path.with_name(".%s.pid%d.tmp" % (path.name, os.getpid()))
    src_fd = os.open(source, os.O_RDONLY) if source is not None and span is not None else None
    try:
        # unbuffered: kernel copies move the file offset underneath any buffer
        with open(tmp, "wb", buffering=0) as f:
            _write_all(f, struct.pack("<Q", len(blob)) + blob)
            for key in order:
                t = tensors[key]
                at = span(t) if src_fd is not None else None
                if at is None or not _kernel_copy(src_fd, f, at, t.numel() * t.element_size()):
                    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
                    for start in range(0, flat.numel(), CHUNK):
                        _write_all(f, memoryview(flat[start:start + CHUNK].numpy()))
            if deferred:
                final = {**meta, **{k: fn() for k, fn in deferred.items()}}
                if any(len(final[k]) != DEFERRED_WIDTH for k in deferred):
                    raise ValueError("deferred metadata must be %d characters" % DEFERRED_WIDTH)
                header["__metadata__"] = final
                f.seek(8)
                _write_all(f, _header_bytes(header))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if src_fd is not None:
            os.close(src_fd)
    _fsync_dir(path.parent)
    return 8 + len(blob) + offset


def _header_bytes(header: dict) -> bytes:
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)  # the data starts 8-aligned, as safetensors writes it


def _write_all(f, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view):]


def _kernel_copy(src_fd: int, f, offset: int, n: int) -> bool:
    """Copy n bytes at `offset` of the source into f by copy_file_range; False if refused."""
    dst_fd = f.fileno()
    done = 0
    try:
        while done < n:
            got = os.copy_file_range(src_fd, dst_fd, n - done, offset + done)
            if got == 0:
                break
            done += got
    except OSError:  # another filesystem or kernel that refuses: write it plainly
        pass
    if done == n:
        return True
    if done:
        os.ftruncate(dst_fd, os.lseek(dst_fd, -done, os.SEEK_CUR))
    return False


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
