"""Write safetensors atomically (hidden temporary, one fsync, rename), in one pass.

Tensors that are untouched bytes of the source file are read from it in place (never
through torch), laid out in the order they lie in the source, so neighbours in the source
stay neighbours in the output and each stretch of them is one run: a safetensors file
whose tensors were only renamed is a new header and one run of its whole data region.
Only tensors made in memory (filled buffers, results of a migration that computes) come
from this process's tensors. safetensors itself wants the data region covered by the
tensors without gaps, which this layout keeps, in any order of names.

Every byte goes out in whole blocks of STEP at offsets that are multiples of STEP,
gathered in one buffer from the source (pread) and from memory. The page cache then
holds the file in large folios, which the disk writes fast: per-run `copy_file_range`
calls that start mid-page left a zip `.pth` (one run per record) 1.6x a synced copy,
its fsync alone 1.5x, and paid 1.2x to 1.9x more where a run moved within its page;
gathered blocks are 1.0x whatever the runs and moves (`python -m benchmarks.write_path`).

A file written from a source can be named by its recipe instead of its bytes (`Recipe`):
the header's sha256, each run copied from the source as its offset and size, and the
sha256 of each run written from memory. With the source's own sha256 that fixes every byte
of the output, so the output is never hashed: hashing it ran at the speed of the copy
and was the whole cost a conversion had over a copy. `check_recipe` proves a file
against its recipe by comparing it with the source.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from .reader import ST_NAMES
from .tempnames import temp_path
from .writeback import STEP, Writeback

CHUNK = 64 * 1024 * 1024
HASH_CHUNK = 8 * 1024 * 1024
# Deferred metadata values (hex sha256 digests) are written last over a placeholder of
# the same width, so they can be computed while the data is written.
DEFERRED_WIDTH = 64


@dataclass(frozen=True)
class Recipe:
    """How a file is made from one source: `runs` in the order they follow the header, each
    (offset in the source, size) for bytes copied from it, or (sha256, size) for bytes
    written from memory."""

    header: str  # sha256 of the header bytes (length and JSON)
    runs: tuple[tuple[int | str, int], ...]

    def name(self, source_sha256: str) -> str:
        """The sha256 of the recipe with its source: equal names, equal bytes."""
        return hashlib.sha256(_canonical({"source": source_sha256, **self.as_json()})).hexdigest()

    def as_json(self) -> dict:
        return {"header": self.header, "runs": [list(r) for r in self.runs]}

    @classmethod
    def from_json(cls, raw) -> "Recipe":
        """The recipe a manifest holds; ValueError unless it has the shape `as_json` writes."""
        try:
            header, runs = raw["header"], tuple((at, size) for at, size in raw["runs"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError("not a recipe (%s)" % exc) from None
        if not _is_sha256(header) or not all(
                type(size) is int and size >= 0 and (_is_sha256(at) or (type(at) is int and at >= 0)) for at, size in runs):
            raise ValueError("not a recipe: a field of the wrong type")
        return cls(header, runs)


@dataclass(frozen=True)
class Written:
    size: int  # bytes in the file
    source_runs: int  # stretches copied from the source: 1 for a safetensors file whose tensors were only renamed
    recipe: Recipe | None = None  # when asked for


@dataclass(frozen=True)
class _Run:
    """Output bytes that come from one place: `at` in the source (read from it unchanged) or,
    with at=None, the tensors `keys` from memory."""

    keys: tuple[str, ...]
    at: int | None
    size: int


def write(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    deferred: Mapping[str, Callable[[], str]] | None = None,
    source: Path | None = None,
    span: Callable[[torch.Tensor], int | None] | None = None,
    recipe: bool = False,
    sync_folder: bool = True,
) -> Written:
    """Write `tensors` to `path`. Memory: one tensor at a time, only for tensors not in `source`.

    `span(t)` gives the offset in `source` where t's bytes lie unchanged, or None.
    `recipe`: also return the file's recipe, which names it without hashing it (only the
    header and the runs from memory are hashed, on another thread while the file is
    written). `sync_folder=False` leaves the folder's fsync to a caller that renames the file
    again (the store does, into its final folder).
    """
    deferred = deferred or {}
    if recipe and deferred:
        raise ValueError("a file with deferred metadata has no recipe until it is written")
    meta = {**metadata, **{k: "0" * DEFERRED_WIDTH for k in deferred}}
    for key, t in tensors.items():
        if t.dtype not in ST_NAMES:
            raise ValueError("%s: dtype %s has no safetensors name" % (key, t.dtype))
    src_fd = os.open(source, os.O_RDONLY) if source is not None and span is not None else None
    try:
        at = {k: span(t) for k, t in tensors.items()} if src_fd is not None else {}
        runs = _runs(tensors, at)
        offsets, offset = {}, 0
        for run in runs:
            for key in run.keys:
                n = _nbytes(tensors[key])
                offsets[key] = (offset, offset + n)
                offset += n
        header: dict = {"__metadata__": meta} if meta else {}
        for key in sorted(tensors):  # names in order; their bytes in the source's order
            t = tensors[key]
            header[key] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": list(offsets[key])}
        head = _framed(header)
        path = Path(path)
        tmp = temp_path(path)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # a few MB at most: filled buffers and what a migration computed
            recipe_of = pool.submit(_recipe, head, runs, tensors) if recipe else None
            try:
                with open(tmp, "wb", buffering=0) as f:
                    with Writeback(f.fileno()) as disk:
                        out = _Blocks(f.fileno(), disk, source)
                        out.put(memoryview(head))
                        for run in runs:
                            if run.at is not None:
                                out.copy(src_fd, run.at, run.size)
                            else:
                                for key in run.keys:
                                    for block in _blocks(tensors[key], CHUNK):
                                        out.put(block)
                        out.flush()
                    if deferred:
                        header["__metadata__"] = {**meta, **{k: fn() for k, fn in deferred.items()}}
                        final = _framed(header)
                        if len(final) != len(head):
                            raise ValueError("deferred metadata must be %d characters" % DEFERRED_WIDTH)
                        os.pwrite(f.fileno(), final, 0)
                    os.fsync(f.fileno())
                made = recipe_of.result() if recipe_of else None
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    finally:
        if src_fd is not None:
            os.close(src_fd)
    if sync_folder:
        _fsync_dir(path.parent)
    return Written(len(head) + offset, sum(run.at is not None for run in runs), made)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _runs(tensors: Mapping[str, torch.Tensor], at: Mapping[str, int | None]) -> list[_Run]:
    """Tensors found in the source, in its order, joined where they touch; then the rest."""
    found = sorted((k for k in tensors if at.get(k) is not None), key=lambda k: (at[k], k))
    runs: list[_Run] = []
    for key in found:
        n = _nbytes(tensors[key])
        last = runs[-1] if runs else None
        if last is not None and last.at is not None and last.at + last.size == at[key]:
            runs[-1] = _Run(last.keys + (key,), last.at, last.size + n)
        else:
            runs.append(_Run((key,), at[key], n))
    rest = tuple(sorted(k for k in tensors if at.get(k) is None))
    if rest:
        runs.append(_Run(rest, None, sum(_nbytes(tensors[k]) for k in rest)))
    return runs


class _Blocks:
    """The output, gathered into blocks of STEP bytes, each written whole at a multiple of
    STEP, the disk started on each (see the module's docstring for why)."""

    def __init__(self, fd: int, disk: Writeback, source: Path | None):
        self.fd, self.disk, self.source = fd, disk, source
        self.view = memoryview(bytearray(STEP))
        self.fill = 0  # bytes gathered in the block
        self.written = 0  # bytes in the file

    def put(self, data: memoryview) -> None:
        data = data.cast("B")
        while data:
            take = min(len(data), STEP - self.fill)
            self.view[self.fill:self.fill + take] = data[:take]
            self.fill += take
            data = data[take:]
            if self.fill == STEP:
                self.flush()

    def copy(self, src_fd: int, at: int, n: int) -> None:
        while n:
            got = os.preadv(src_fd, [self.view[self.fill:self.fill + min(n, STEP - self.fill)]], at)
            if not got:
                raise ValueError("%s ends before byte %d, which it had when it was read: it changed while it was "
                                 "converted. Convert it again once it is whole." % (self.source, at + n))
            self.fill += got
            at += got
            n -= got
            if self.fill == STEP:
                self.flush()

    def flush(self) -> None:
        block = self.view[:self.fill]
        while block:
            block = block[os.write(self.fd, block):]
        self.written += self.fill
        self.fill = 0
        self.disk.reached(self.written)


def _blocks(t: torch.Tensor, size: int):
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), size):
        yield memoryview(flat[start:start + size].numpy())


def _recipe(head: bytes, runs: list[_Run], tensors: Mapping[str, torch.Tensor]) -> Recipe:
    made = []
    for run in runs:
        if run.at is not None:
            made.append((run.at, run.size))
        else:
            h = hashlib.sha256()
            for key in run.keys:
                for block in _blocks(tensors[key], HASH_CHUNK):
                    h.update(block)
            made.append((h.hexdigest(), run.size))
    return Recipe(hashlib.sha256(head).hexdigest(), tuple(made))


def check_recipe(path: Path, recipe: Recipe, source: Path) -> str | None:
    """Why the file at `path` is not what `recipe` makes of `source`, or None if it is.
    Where they differ, the caller says whether the source (by its sha256) is to blame."""
    with open(path, "rb") as out, open(source, "rb") as src:
        size = os.fstat(out.fileno()).st_size
        length = out.read(8)
        n = struct.unpack("<Q", length)[0] if len(length) == 8 else size
        if 8 + n > size:
            return "its header is cut short"
        if hashlib.sha256(length + out.read(n)).hexdigest() != recipe.header:
            return "its header differs from the one written"
        want = 8 + n + sum(run_size for _, run_size in recipe.runs)
        if size != want:
            return "it is %d bytes, not the %d written" % (size, want)
        at_out = 8 + n
        for at, run_size in recipe.runs:
            if isinstance(at, str):
                h = hashlib.sha256()
                for block in _chunks(out, run_size):
                    h.update(block)
                if h.hexdigest() != at:
                    return "bytes %d to %d (written from memory) differ from those written" % (at_out, at_out + run_size)
            else:
                src.seek(at)
                for block in _chunks(out, run_size):
                    if src.read(len(block)) != block:
                        return "bytes %d to %d differ from the source's at %d" % (at_out, at_out + run_size, at)
            at_out += run_size
    return None


def _chunks(f, n: int):
    while n > 0:
        block = f.read(min(HASH_CHUNK, n))
        if not block:
            return
        n -= len(block)
        yield block


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _framed(header: dict) -> bytes:
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-aligned, as safetensors writes it
    return struct.pack("<Q", len(blob)) + blob


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
