"""Write safetensors one tensor at a time, atomically (hidden temporary, fsync, rename)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import torch

from .reader import ST_NAMES

CHUNK = 64 * 1024 * 1024


def write(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> int:
    """Write `tensors` to `path`; returns the bytes written. Memory: one tensor at a time."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    order = sorted(tensors)
    for key in order:
        t = tensors[key]
        if t.dtype not in ST_NAMES:
            raise ValueError("%s: dtype %s has no safetensors name" % (key, t.dtype))
        n = t.numel() * t.element_size()
        header[key] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-aligned, as safetensors writes it
    path = Path(path)
    tmp = path.with_name(".%s.pid%d.tmp" % (path.name, os.getpid()))
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for key in order:
                flat = tensors[key].detach().contiguous().reshape(-1).view(torch.uint8)
                for start in range(0, flat.numel(), CHUNK):
                    f.write(memoryview(flat[start:start + CHUNK].numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return 8 + len(blob) + offset


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
