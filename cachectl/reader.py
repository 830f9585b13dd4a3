"""Open a checkpoint without running code from it, and unwrap what people save around it.

Tensors stay lazy: safetensors and torch zip files are memory-mapped, so reading the
layout touches headers only, and converting touches one tensor at a time.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import pickle
import re
import stat
import struct
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from .errors import CheckpointError, UnsafeCheckpointError
# what needs no torch is shared with the header reader that `inspect` uses
from .headers import SAFETENSORS_HEADER_LIMIT, Header, Hints, NotPlain, TensorRecord, unwrap, zip_records
from .headers import merge_hints as _merge_hints
from .headers import repo_id as _repo_id
from .headers import strip_prefixes as _strip_prefixes
from .layout import Layout, TensorSpec
from .paths import SNAPSHOT_WEIGHTS
from .recent import Recent
from .regular import open_regular

CONFIG_LIMIT = 16 * 1024 * 1024  # a snapshot's config.json is a few KB

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Checkpoint(Header):
    """A checkpoint as its header describes it, with its tensors, mapped from the file."""

    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    # offset in `weights` where a tensor's bytes lie unchanged, None if they do not
    # (so a writer can copy them from the file); tensors are never modified in place
    span: Callable[[torch.Tensor], int | None] | None = field(default=None, repr=False, compare=False)


def read(path: str | os.PathLike, *, ema: bool = True) -> Checkpoint:
    """Open `path` (a checkpoint file or an HF snapshot folder) safely and lazily.

    Of a training checkpoint holding both, the EMA copy of the weights is read, as timm's
    own `load_checkpoint` does (`use_ema=True` from 0.6 on); `ema=False` reads the other.
    """
    path = Path(path)
    if path.is_dir():
        return _read_snapshot(path, ema)
    if not path.exists():
        raise CheckpointError(path, "no such file", "Check the path.")
    return _read_file(path, path, ema, Hints())


def _read_file(path: Path, weights: Path, ema: bool, hints: Hints) -> Checkpoint:
    fd = open_regular(weights)
    try:
        # everything below opens the file it checked, through its descriptor: a file
        # swapped for a FIFO or a link meanwhile is never opened
        via = Path("/proc/self/fd/%d" % fd)
        if not via.exists():
            via = weights
        return _read_open(path, weights, fd, via, os.fstat(fd).st_size, ema, hints)
    finally:
        os.close(fd)


def _read_open(path: Path, weights: Path, fd: int, via: Path, size: int, ema: bool, hints: Hints) -> Checkpoint:
    head = os.pread(fd, 9, 0)
    base, header_layout = None, None
    if head[:4] == b"PK\x03\x04":
        with _open_zip(weights, via, size) as z:
            mapped = _mapped_zip(z, fd, via, size)
        obj, base = mapped if mapped is not None else (_torch_load(weights, via, mmap=True), None)
        fmt = "torch-zip"
        metadata: dict[str, str] = {}
    elif _looks_like_safetensors(head):
        tensors, metadata, base, header_layout = _safetensors(weights, fd, size, head)
        fmt = "safetensors"
        obj = tensors
    elif head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        obj = _torch_load(weights, via, mmap=False)
        fmt = "torch-legacy"
        metadata = {}
    else:
        raise CheckpointError(
            weights,
            "not a checkpoint (neither safetensors, a torch zip file nor a torch pickle)",
            "Give a file saved with torch.save or safetensors.",
        )
    if fmt == "safetensors" and obj:
        # a flat dict of tensors whose extents the header check proved: nothing to unwrap
        # or measure, and looking would build every tensor
        state, container, others, extras = obj, None, (), {}
    else:
        state, container, others, extras = _unwrap(obj, weights, ema)
        _check_extent(weights, state)
    state, prefix = _strip_prefixes(state)
    hints = _merge_hints(hints, extras, metadata)
    if header_layout is not None and not prefix and list(state) == list(obj):
        layout = header_layout  # the header's own entries, in its order
    else:
        layout = Layout.from_specs({k: TensorSpec(tuple(v.shape), dtype_name(v.dtype)) for k, v in state.items()})
    if fmt == "torch-zip" and base is None:
        base = _zip_base(via, state)
    return Checkpoint(
        path=path, weights=weights, format=fmt, layout=layout, tensors=state, container=container,
        other_containers=others, stripped_prefix=prefix, hints=hints, metadata=metadata,
        span=_spanner(base, size) if base is not None else None,
    )


# torch.save stores its records uncompressed, and its data.pkl holds little per tensor:
# an archive that inflates far past its size, or a huge data.pkl, is a bomb, not weights.
PICKLE_LIMIT = 64 * 1024 * 1024


def _open_zip(path: Path, via: Path, size: int) -> zipfile.ZipFile:
    """The zip file, open, once it is known to be whole and no bomb."""
    try:
        z = zipfile.ZipFile(via)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(path, "damaged or truncated torch file (%s)" % _first_line(exc),
                              "Copy the file again from its source; if a copy is still running, wait for it.")
    infos = z.infolist()
    inflated = sum(i.file_size for i in infos)
    pickled = max((i.file_size for i in infos if i.filename.endswith("data.pkl")), default=0)
    if inflated > 4 * size + PICKLE_LIMIT or pickled > PICKLE_LIMIT:
        z.close()
        raise CheckpointError(path, "not a torch file but a zip bomb (its records inflate to %d bytes from %d%s)" % (
            inflated, size, ", data.pkl alone to %d" % pickled if pickled > PICKLE_LIMIT else ""),
                              "Delete it; ask whoever made it for the weights saved with torch.save.")
    return z


# A tensor may show more bytes than its storage holds (a zero or overlapping stride, as
# expand() makes): beyond this, converting it would write far more than the file holds.
EXPANDED_LIMIT = 64 * 1024 * 1024


def _check_extent(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if n > EXPANDED_LIMIT and n > t.untyped_storage().nbytes():
            raise CheckpointError(path, "tensor %r shows %d bytes made of %d stored ones (a zero or overlapping "
                                        "stride): converting it would write them all" % (
                                            key, n, t.untyped_storage().nbytes()),
                                  "Re-save it with contiguous tensors: {k: v.contiguous() for k, v in state.items()}.")


def _spanner(base: int, size: int) -> Callable[[torch.Tensor], int | None]:
    def span(t: torch.Tensor) -> int | None:
        ptr, n = t.data_ptr(), t.numel() * t.element_size()
        if t.is_contiguous() and base <= ptr and ptr + n <= base + size:
            return ptr - base
        return None
    return span


def _map(fd: int, size: int) -> torch.Tensor:
    """The file's bytes, mapped privately: pages are read when touched, never written back.

    Python's mmap, not torch's `from_file`: that one opens the file again by name and costs
    twice as much, which is most of reading a header a daemon has seen before. Writable
    only in the sense of copy-on-write, which spares torch's warning about read-only memory;
    the tensor keeps the map alive."""
    if not size:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE),
                            dtype=torch.uint8)


def _mapped_zip(z: zipfile.ZipFile, fd: int, via: Path, size: int) -> tuple[Any, int] | None:
    """The object in a torch zip file with its tensors mapped from the file, and the
    address the file is mapped at; None when only torch's own loader can say.

    The same tensors torch.load(weights_only=True, mmap=True) gives (tests compare them),
    from cachectl/headers.py's unpickler, which builds nothing but tensor records: torch's
    is written in Python and was most of a conversion's fixed cost (60 to 80 ms for a
    ResNet-50). Anything that unpickler does not know, torch reads, with its own checks.
    """
    try:
        obj, stored = zip_records(z, via)
    except (NotPlain, OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, struct.error,
            TypeError, KeyError, IndexError, AttributeError, RecursionError, MemoryError):
        return None
    dtypes = {s.dtype: getattr(torch, s.dtype, None) for s in stored.values()}
    if any(d is None for d in dtypes.values()) or any(
            s.offset % dtypes[s.dtype].itemsize or s.offset + s.nbytes > size for s in stored.values()):
        return None  # unaligned or past the end: torch copies or refuses
    raw = _map(fd, size)
    typed = {key: raw[s.offset:s.offset + s.nbytes].view(dtypes[s.dtype])
             for key, s in stored.items()}

    def build(x: Any) -> Any:
        if isinstance(x, TensorRecord):
            if x.storage not in typed or any(d < 0 for d in x.stride) or len(x.stride) != len(x.shape):
                raise NotPlain("a tensor outside its storage")
            return typed[x.storage].as_strided(x.shape, x.stride, typed[x.storage].storage_offset() + x.offset)
        if isinstance(x, dict):
            return type(x)((k, build(v)) for k, v in x.items()) if type(x) in (dict, OrderedDict) else x
        if isinstance(x, (list, tuple)):
            return type(x)(build(v) for v in x) if type(x) in (list, tuple) else x
        return x

    try:
        return build(obj), raw.data_ptr()
    except (NotPlain, RuntimeError, RecursionError, MemoryError):
        return None


def _zip_base(path: Path, state: Mapping[str, torch.Tensor]) -> int | None:
    """Where torch mapped the zip file, from where its first data record landed.

    torch.load(mmap=True) maps the file once and its storages are slices of that map;
    the storage at the lowest address is the data record at the lowest offset. The
    answer is checked against the file's bytes, and None where it does not hold.
    """
    storages = [t.untyped_storage() for t in state.values() if t.untyped_storage().nbytes()]
    if not storages:
        return None
    first = min(storages, key=lambda s: s.data_ptr())
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        offsets = []
        for info in z.infolist():
            if "/data/" in info.filename and info.compress_type == zipfile.ZIP_STORED and info.file_size:
                f.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", f.read(4))
                offsets.append(info.header_offset + 30 + name_len + extra_len)
        if not offsets:
            return None
        start = min(offsets)
        base = first.data_ptr() - start
        # every storage must start exactly at a data record, or the guess is wrong
        if not {s.data_ptr() - base for s in storages} <= set(offsets):
            return None
        n = min(64, first.nbytes())
        f.seek(start)
        expected = f.read(n)
    actual = bytes(torch.tensor([], dtype=torch.uint8).set_(first)[:n].tolist())
    return base if actual == expected else None


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= SAFETENSORS_HEADER_LIMIT and head[8:9] == b"{"


def _safetensors(path: Path, fd: int, size: int, head: bytes) -> tuple[Mapping[str, torch.Tensor], dict[str, str], int | None, Layout]:
    (n,) = struct.unpack("<Q", head[:8])
    # a header claiming more than the file holds is read as far as the file goes, never allocated
    raw = _pread_all(fd, min(n, max(size - 8, 0)), 8)
    if len(raw) < n:
        raise CheckpointError(path, "truncated safetensors file (the header is cut short)",
                              "Copy the file again from its source.")
    header = _parsed_header(path, raw)
    data_start = 8 + n
    if data_start + header.end > size:
        raise CheckpointError(
            path, "truncated safetensors file (%d bytes, the header describes %d)" % (size, data_start + header.end),
            "Copy the file again from its source; if a copy is still running, wait for it to finish.",
        )
    raw_bytes = _map(fd, size)
    base = raw_bytes.data_ptr() if size else None
    return _MappedTensors(header, raw_bytes, data_start, size), dict(header.metadata), base, header.layout


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    """Up to `n` bytes at `offset`, fewer only where the file ends: one pread may return
    less than asked (a signal, a network filesystem)."""
    parts = []
    while n > 0:
        got = os.pread(fd, n, offset)
        if not got:
            break
        parts.append(got)
        n, offset = n - len(got), offset + len(got)
    return b"".join(parts)


class _MappedTensors(Mapping):
    """A safetensors file's tensors, each viewed from the file's mapping when first asked
    for, then kept (the same object every time). A file served as it is needs its header,
    not hundreds of tensor objects: ResNet-50's 320 views were most of reading it."""

    def __init__(self, header: "_Header", raw: torch.Tensor, data_start: int, size: int):
        self._entries, self._raw, self._start, self._size = header.entries, raw, data_start, size
        self._typed: dict[torch.dtype, torch.Tensor] = {}  # the mapping viewed once per dtype
        self._made: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        made = self._made.get(key)
        if made is None:
            # setdefault: two threads asking at once get one object, as `is` checks expect
            made = self._made.setdefault(key, self._view(*self._entries[key]))
        return made

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def _view(self, dtype: torch.dtype, shape: list[int], strides: list[int], begin: int, stop: int) -> torch.Tensor:
        begin, stop = self._start + begin, self._start + stop
        width = dtype.itemsize
        if begin % width:  # unaligned: only a copy can be viewed as a wider dtype
            return self._raw[begin:stop].clone().view(dtype).reshape(shape)
        typed = self._typed.get(dtype)
        if typed is None:
            typed = self._typed.setdefault(dtype, self._raw[:self._size - self._size % width].view(dtype))
        # one call per tensor, not a slice, a view and a reshape
        return typed.as_strided(shape, strides, begin // width)


@dataclass(frozen=True)
class _Header:
    """A safetensors header, parsed and checked: each tensor's key to its dtype, shape,
    strides and data offsets, in the header's order; the metadata, where the data ends, and
    the layout it makes."""

    entries: Mapping[str, tuple[torch.dtype, list[int], list[int], int, int]]
    metadata: Mapping[str, str]
    end: int
    layout: Layout


# Headers parsed and checked, by their bytes: the files of one architecture saved by one
# tool have byte-identical headers (same keys, shapes and offsets), so a daemon taking in
# hundreds of them parses each kind once (ResNet-50's 320 entries: about 2 ms each time).
_HEADERS: "Recent[_Header]" = Recent(32)
_HEADER_KEPT_BYTES = 1 << 20  # a model's header is tens of KB; a larger one is not remembered


def _parsed_header(path: Path, raw: bytes) -> _Header:
    known = _HEADERS.get(raw)
    if known is not None:
        return known
    try:
        header = json.loads(raw)
    except RecursionError:
        raise CheckpointError(path, "damaged safetensors header (nested too deeply to be one)",
                              "Copy the file again from its source.")
    except ValueError as exc:
        raise CheckpointError(path, "damaged safetensors header (%s)" % exc, "Copy the file again from its source.")
    if not isinstance(header, dict):
        raise CheckpointError(path, "damaged safetensors header (not a JSON object)", "Copy the file again from its source.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "damaged safetensors header (__metadata__ is not an object)",
                              "Copy the file again from its source.")
    end = _check_entries(path, header)
    entries = MappingProxyType({key: (_ST_DTYPES[info["dtype"]], info["shape"], _contiguous_strides(info["shape"]), *info["data_offsets"])
                                for key, info in header.items()})
    layout = Layout.from_specs({key: TensorSpec(tuple(shape), dtype_name(dtype)) for key, (dtype, shape, *_) in entries.items()})
    parsed = _Header(entries, MappingProxyType({str(k): str(v) for k, v in metadata.items()}), end, layout)
    if len(raw) <= _HEADER_KEPT_BYTES:
        _HEADERS.put(raw, parsed)
    return parsed


def _contiguous_strides(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return strides[::-1]


def _check_entries(path: Path, header: dict) -> int:
    """Where the data the header describes ends; CheckpointError for any entry that lies.

    Checked here, before any bytes reach torch, so that a hostile header (a shape larger
    than its bytes, negative or overlapping offsets, NaN) is one clear error, never a
    traceback or a huge allocation."""
    spans = []
    for key, info in header.items():
        def bad(what: str) -> CheckpointError:
            return CheckpointError(path, "damaged safetensors header: tensor %r %s" % (key, what),
                                   "Copy the file again from its source.")

        if not isinstance(info, dict):
            raise bad("is not an object")
        dtype = _ST_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise CheckpointError(path, "tensor %s has unsupported dtype %s" % (key, info.get("dtype")),
                                  "Re-save it with a standard dtype.")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad("has a shape that is not a list of non-negative integers (%r)" % (shape,))
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise bad("has data_offsets that are not two ascending non-negative integers (%r)" % (offsets,))
        count = 1
        for d in shape:
            count *= d
        if count * dtype.itemsize != offsets[1] - offsets[0]:
            raise bad("has shape %s of %s, %d bytes, in %d bytes of data" % (
                shape, info["dtype"], count * dtype.itemsize, offsets[1] - offsets[0]))
        spans.append((offsets[0], offsets[1], key))
    spans.sort()
    for (_, first_end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < first_end:
            raise CheckpointError(path, "damaged safetensors header: tensors %r and %r overlap" % (first, second),
                                  "Copy the file again from its source.")
    return max((e for _, e, _ in spans), default=0)


def _safe_globals() -> list:
    # Plain data that timm training checkpoints carry next to the weights (the argparse
    # namespace of the run, numpy scalars for metrics). None of these can run code.
    allowed: list = [argparse.Namespace]
    try:
        import numpy as np

        allowed += [np.dtype, np.ndarray, type(np.dtype("float64")), type(np.dtype("float32")), type(np.dtype("int64"))]
        core = getattr(np, "_core", None) or np.core
        allowed += [core.multiarray.scalar, core.multiarray._reconstruct]
    except (ImportError, AttributeError):
        pass
    return allowed


def _torch_load(path: Path, via: Path, *, mmap: bool) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(via, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "Unsupported" not in str(exc):
            raise CheckpointError(path, "damaged or truncated torch file (%s)" % _first_line(exc),
                                  "Copy the file again from its source.")
        needed = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc)))) or [_first_line(exc)]
        raise UnsafeCheckpointError(
            path,
            "refused: unpickling it would run code (it needs %s)" % ", ".join(needed),
            "Where the file is trusted, re-save its weights alone: python -c \"import torch; "
            "c = torch.load('%s', weights_only=False); "
            "torch.save(c.get('state_dict', c) if isinstance(c, dict) else c.state_dict(), 'clean.pth')\"" % path.name,
        )
    except (MemoryError, RecursionError) as exc:
        # an allowed loader (numpy's) asked for more than there is, or a pickle nested past Python's stack
        raise CheckpointError(path, "damaged or hostile torch file (%s while unpickling it)" % type(exc).__name__,
                              "Copy the file again from its source; if it came from elsewhere, ask its author.")
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            # torch's weights_only unpickler on bytes that are not a pickle: a short read,
            # an empty stack, a memo key never set
            struct.error, IndexError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(path, "damaged or truncated torch file (%s)" % _first_line(exc),
                              "Copy the file again from its source; if a copy is still running, wait for it.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].split(". ")[0] if text else type(exc).__name__


def _unwrap(obj: Any, path: Path, ema: bool) -> tuple[dict, str | None, tuple[str, ...], dict]:
    """The state dict inside `obj`, the container it came from, others present, extras."""
    if isinstance(obj, torch.nn.Module):  # not reachable with weights_only, kept out of the contract
        raise CheckpointError(path, "holds a whole pickled model", "Save model.state_dict() instead.")
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, "holds a %s, not a state dict" % type(obj).__name__,
                              "Save a dict of tensors (model.state_dict()).")
    found = unwrap(obj, ema, torch.Tensor)
    if found is None:
        raise CheckpointError(
            path, "holds no tensors (top-level keys: %s)" % ", ".join(map(str, list(obj)[:8])),
            "Point cachectl at a file with model weights.",
        )
    return found


def _read_snapshot(folder: Path, ema: bool) -> Checkpoint:
    """An HF snapshot folder: config.json beside model.safetensors or pytorch_model.bin."""
    for name in SNAPSHOT_WEIGHTS:
        if (folder / name).is_file():
            weights = folder / name
            break
    else:
        raise CheckpointError(folder, "folder has no model.safetensors or pytorch_model.bin",
                              "Point cachectl at a Hugging Face snapshot folder or at a checkpoint file.")
    hints = Hints(repo_id=_repo_id(folder))
    config_path = folder / "config.json"
    if config_path.is_file():
        fd = open_regular(config_path)
        with open(fd, "rb") as f:
            text = f.read(CONFIG_LIMIT + 1)
        try:
            if len(text) > CONFIG_LIMIT:
                raise ValueError("over %d bytes" % CONFIG_LIMIT)
            config = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(config_path, "is not valid JSON (%s)" % (exc or "nested too deeply"),
                                  "Copy the snapshot again.")
        if not isinstance(config, dict):
            raise CheckpointError(config_path, "is not a JSON object", "Copy the snapshot again.")
        arch = config.get("architecture") or config.get("model_name")
        num_classes = config.get("num_classes")
        hints = Hints(
            architecture=arch if isinstance(arch, str) else None,
            architecture_source="config.json" if isinstance(arch, str) else None,
            num_classes=num_classes if isinstance(num_classes, int) else None,
            repo_id=hints.repo_id,
        )
    if not hints.architecture and hints.repo_id and hints.repo_id.startswith("timm/"):
        hints = Hints(architecture=hints.repo_id.split("/", 1)[1], architecture_source="the hub repo name",
                      num_classes=hints.num_classes, repo_id=hints.repo_id)
    return _read_file(folder, weights, ema, hints)
