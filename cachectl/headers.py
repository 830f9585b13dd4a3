"""A checkpoint's layout from its headers alone, without torch: what `inspect` reads.

safetensors: the JSON header. torch zip files (and the legacy torch format): the pickle
that describes the tensors, read by an unpickler that knows only what torch's own
`weights_only` unpickler allows and builds nothing from it: a tensor becomes its dtype
and shape, a storage the key of its bytes. No tensor bytes are read.

This module answers only what it is sure of. Anything it does not know (a global
outside its list, a quantized or sparse tensor, a header that does not add up) is
`NotPlain`: the caller reads the file with cachectl/reader.py, which decides, with its
own checks and messages, whether the file is damaged, unsafe or fine.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import stat
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .layout import Layout, TensorSpec
from .paths import SNAPSHOT_WEIGHTS

# Containers people wrap weights in, in the order timm's own load_checkpoint prefers them
# with use_ema=False; with use_ema=True (its default) the EMA copies come first.
CONTAINERS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")
EMA_CONTAINERS = ("state_dict_ema", "model_ema")
# Prefixes added by DataParallel/DDP, torch.compile and training wrappers.
PREFIXES = ("module.", "_orig_mod.", "model.")
SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024
# a torch zip's pickle: megabytes for a checkpoint with optimizer state; more is the reader's to judge
DATA_PKL_LIMIT = 256 * 1024 * 1024

# safetensors dtype -> (torch's name for it, bytes per element)
ST_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
# torch's typed storage classes, as torch.save names them in a pickle
_STORAGES = {
    "DoubleStorage": ("float64", 8), "FloatStorage": ("float32", 4), "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2), "LongStorage": ("int64", 8), "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2), "CharStorage": ("int8", 1), "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1), "ComplexFloatStorage": ("complex64", 8), "ComplexDoubleStorage": ("complex128", 16),
}
_DTYPES = {name: size for name, size in list(ST_DTYPES.values()) + list(_STORAGES.values())}


class NotPlain(Exception):
    """The headers alone do not say it safely: read the file with cachectl/reader.py."""


@dataclass(frozen=True)
class Hints:
    """What the file says about itself besides its tensors."""

    architecture: str | None = None  # a model name, from metadata, config.json or `arch`
    architecture_source: str | None = None  # where that name came from
    num_classes: int | None = None
    repo_id: str | None = None  # an HF repo name, e.g. timm/vit_base_patch16_224.augreg_in21k
    cachectl: Mapping[str, str] = field(default_factory=dict)  # metadata cachectl wrote itself


@dataclass(frozen=True)
class Header:
    """What a checkpoint's headers say of it: identification's input (cachectl/reader.py's
    Checkpoint adds the tensors themselves)."""

    path: Path  # what the user named: a file or an HF snapshot folder
    weights: Path  # the file the tensors are in
    format: str  # safetensors | torch-zip | torch-legacy
    layout: Layout
    container: str | None = None
    other_containers: tuple[str, ...] = ()
    stripped_prefix: str = ""
    hints: Hints = field(default_factory=Hints)
    metadata: Mapping[str, str] = field(default_factory=dict)
    tensors: Mapping[str, "TensorRecord"] = field(default_factory=dict, repr=False, compare=False)

    @property
    def size(self) -> int:
        return self.weights.stat().st_size


@dataclass(frozen=True)
class TensorRecord:
    """A tensor as its header describes it."""

    dtype: str
    shape: tuple[int, ...]
    # of a torch pickle's tensor: the key of its storage, and where in it the tensor lies
    # (in elements), so cachectl/reader.py can map it without torch's unpickler
    storage: str | None = None
    offset: int = 0
    stride: tuple[int, ...] = ()


@dataclass(frozen=True)
class StoredBytes:
    """A storage's bytes in a torch zip file: uncompressed, `nbytes` from `offset`."""

    dtype: str
    offset: int
    nbytes: int


def read_header(path: str | os.PathLike, *, ema: bool = True) -> Header:
    """The layout, container, prefix and hints of `path` (a file or an HF snapshot folder),
    as cachectl.reader.read gives them; NotPlain when only the reader can say."""
    path = Path(path)
    if path.is_dir():
        weights, hints = snapshot(path)
        return _read_file(path, weights, ema, hints)
    return _read_file(path, path, ema, Hints())


def _read_file(path: Path, weights: Path, ema: bool, hints: Hints) -> Header:
    try:
        if not stat.S_ISREG(os.stat(weights).st_mode):
            raise NotPlain("not a regular file")
        with open(weights, "rb") as f:
            head = f.read(8)
        metadata: dict[str, str] = {}
        if head[:4] == b"PK\x03\x04":
            fmt, obj = "torch-zip", _zip_pickle(weights)
        elif head[:2] == b"\x80\x02":
            fmt, obj = "torch-legacy", _legacy_pickle(weights)
        else:
            fmt = "safetensors"
            obj, metadata = _safetensors(weights, head)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, struct.error,
            TypeError, KeyError, IndexError, AttributeError, RecursionError, MemoryError) as exc:
        raise NotPlain("%s: %s" % (type(exc).__name__, exc))
    state, container, others, extras = _unwrap(obj, ema)
    state, prefix = strip_prefixes(state)
    layout = Layout.from_specs({k: TensorSpec(v.shape, v.dtype) for k, v in state.items()})
    return Header(path=path, weights=weights, format=fmt, layout=layout, container=container, other_containers=others,
                  stripped_prefix=prefix, hints=merge_hints(hints, extras, metadata), metadata=metadata,
                  tensors=state)


def _safetensors(path: Path, head: bytes) -> tuple[dict[str, TensorRecord], dict[str, str]]:
    (n,) = struct.unpack("<Q", head)
    if not 0 < n <= SAFETENSORS_HEADER_LIMIT:
        raise NotPlain("no safetensors header")
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(n)
    header = json.loads(raw)
    if len(raw) < n or not isinstance(header, dict):
        raise NotPlain("damaged safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NotPlain("safetensors metadata that is not strings")
    tensors, spans = {}, []
    for key, info in header.items():
        name, itemsize = ST_DTYPES[info["dtype"]]
        shape, (begin, end) = info["shape"], info["data_offsets"]
        if not all(type(d) is int and d >= 0 for d in shape) or not (type(begin) is type(end) is int and 0 <= begin <= end):
            raise NotPlain("tensor %r: bad shape or offsets" % key)
        if _count(shape) * itemsize != end - begin:
            raise NotPlain("tensor %r: its shape does not fill its bytes" % key)
        spans.append((begin, end))
        tensors[key] = TensorRecord(name, tuple(shape))
    spans.sort()
    if any(b < e for (_, e), (b, _) in zip(spans, spans[1:])) or 8 + n + max((e for _, e in spans), default=0) > size:
        raise NotPlain("overlapping or truncated tensors")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- torch's pickles ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


class _Opaque:
    """Plain data torch's weights_only loader allows beside the weights (numpy scalars and
    arrays of a run's metrics): never built, never needed to find the weights."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _Marker:
    def __init__(self, name: str):
        self.name = name


_TENSOR, _PARAMETER = _Marker("Tensor"), _Marker("Parameter")


def _rebuild_tensor(storage, offset, size, stride, *rest):
    dtype = rest[2].name if len(rest) >= 3 and isinstance(rest[2], _Marker) else None  # _rebuild_tensor_v3's dtype
    if not isinstance(storage, _Storage) or not all(type(d) is int and d >= 0 for d in size):
        raise NotPlain("a tensor that is not a plain view of a storage")
    if _count(size) and offset + sum((d - 1) * s for d, s in zip(size, stride)) >= storage.numel:
        raise NotPlain("a tensor larger than its storage")
    if _count(size) > storage.numel:
        raise NotPlain("a tensor that shows more elements than its storage holds (a zero stride)")
    if dtype is not None and dtype != storage.dtype:
        raise NotPlain("a tensor of another dtype than its storage")
    return TensorRecord(storage.dtype, tuple(size), storage.key, offset, tuple(stride))


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    if not isinstance(data, TensorRecord):
        raise NotPlain("a parameter without a tensor")
    return data


def _rebuild_from_type(func, new_type, args, state):
    if new_type not in (_TENSOR, _PARAMETER) or func not in (_rebuild_tensor, _rebuild_parameter):
        raise NotPlain("a tensor subclass")
    return func(*args)


def _latin1(text, encoding="latin1"):
    if encoding != "latin1" or not isinstance(text, str):
        raise NotPlain("_codecs.encode other than latin1")
    return text.encode("latin1")


# The globals torch's weights_only unpickler allows that a timm checkpoint uses, and
# cachectl/reader.py's extras (a training run's argparse namespace, numpy metrics).
_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TENSOR,
    ("torch._tensor", "Tensor"): _TENSOR,
    ("torch.nn.parameter", "Parameter"): _PARAMETER,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _latin1,
    ("argparse", "Namespace"): argparse.Namespace,
    **{(np, name): _Opaque for np in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name in ("scalar", "_reconstruct")},
    ("numpy", "dtype"): _Opaque,
    ("numpy", "ndarray"): _Opaque,
    **{("numpy.dtypes", name): _Opaque for name in ("Float64DType", "Float32DType", "Int64DType")},
    **{("torch", name): _Marker(name) for name in _DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}  # every storage the pickle names, by key

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise NotPlain("the pickle needs %s.%s" % (module, name)) from None

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], tuple)
                and type(pid[4]) is int and (len(pid) == 5 or pid[5] is None)):
            raise NotPlain("a persistent id other than a whole storage")
        dtype, _ = pid[1]
        return self.storages.setdefault(str(pid[2]), _Storage(str(pid[2]), dtype, pid[4]))


def _zip_pickle(path: Path) -> Any:
    with zipfile.ZipFile(path) as z:
        return zip_records(z, path, offsets=False)[0]


def zip_records(z: zipfile.ZipFile, path: Path, *, offsets: bool = True) -> tuple[Any, dict[str, StoredBytes]]:
    """The object a torch zip file's pickle describes, its tensors as records, and where
    each storage's bytes lie in the file (`offsets`: else every offset is 0). `z` is the
    file at `path`, opened by the caller (reading its central directory costs a few ms)."""
    infos = {i.filename: i for i in z.infolist()}
    pkl = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise NotPlain("no single data.pkl")
    folder = pkl[0][: -len("data.pkl")]
    order = infos.get(folder + "byteorder")
    if order is not None and z.read(order) != b"little":
        raise NotPlain("a byte order other than little-endian")
    if infos[pkl[0]].file_size > DATA_PKL_LIMIT:
        raise NotPlain("a data.pkl of %d bytes" % infos[pkl[0]].file_size)
    unpickler = _Unpickler(z.open(pkl[0]))
    obj = unpickler.load()
    stored = {}
    with open(path, "rb") as f:
        for s in unpickler.storages.values():  # each storage's bytes are in the file, whole: a cut copy is the reader's to explain
            info = infos.get(folder + "data/" + s.key)
            nbytes = s.numel * _DTYPES[s.dtype]
            if info is None or info.file_size != nbytes or info.compress_type != zipfile.ZIP_STORED:
                raise NotPlain("storage %s is missing or cut short, or compressed" % s.key)
            at = 0
            if offsets:  # the data follow the record's local header and its own name and extra field
                f.seek(info.header_offset)
                local = f.read(30)
                if len(local) != 30 or local[:4] != b"PK\x03\x04":
                    raise NotPlain("storage %s has no local header" % s.key)
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                at = info.header_offset + 30 + name_len + extra_len
            stored[s.key] = StoredBytes(s.dtype, at, nbytes)
    return obj, stored


def _legacy_pickle(path: Path) -> Any:
    # magic number, protocol version, system info, then the object (storages follow it)
    with open(path, "rb") as f:
        for _ in range(3):
            _Unpickler(f).load()
        unpickler = _Unpickler(f)
        obj = unpickler.load()
        storages = unpickler.storages
        keys = _Unpickler(f).load()
        # then each storage in `keys` order: its element count (8 bytes) and its bytes
        need = sum(8 + storages[k].numel * _DTYPES[storages[k].dtype] for k in keys)
        if set(keys) != set(storages) or os.fstat(f.fileno()).st_size - f.tell() < need:
            raise NotPlain("storages missing or cut short")
    return obj


# -- what people save around the weights, as cachectl/reader.py unwraps it -----------------


def _unwrap(obj: Any, ema: bool) -> tuple[dict, str | None, tuple[str, ...], dict]:
    if not isinstance(obj, Mapping):
        raise NotPlain("not a dict")
    found = unwrap(obj, ema, TensorRecord)
    if found is None:
        raise NotPlain("no tensors")
    return found


def unwrap(obj: Mapping, ema: bool, kind: type) -> tuple[dict, str | None, tuple[str, ...], dict] | None:
    """The state dict inside `obj` (values of type `kind`: records here, tensors in the
    reader), the container it came from, others present, extras; None without tensors."""
    extras = {k: obj[k] for k in ("arch", "num_classes", "epoch", "version") if k in obj and not isinstance(obj[k], kind)}
    args = obj.get("args")
    if isinstance(args, argparse.Namespace) and "arch" not in extras and getattr(args, "model", None):
        extras["arch"] = args.model
    if obj and all(isinstance(v, kind) for v in obj.values()):
        return dict(obj), None, (), extras
    present = [c for c in CONTAINERS if isinstance(obj.get(c), Mapping) and obj.get(c)]
    order = [c for c in present if c in EMA_CONTAINERS] + [c for c in present if c not in EMA_CONTAINERS] if ema else present
    for name in order:
        inner = obj[name]
        if any(isinstance(v, kind) for v in inner.values()):
            state = {k: v for k, v in inner.items() if isinstance(v, kind)}
            return state, name, tuple(c for c in present if c != name), extras
    tensors = {k: v for k, v in obj.items() if isinstance(v, kind)}
    return (tensors, None, (), extras) if tensors else None


def strip_prefixes(state: dict) -> tuple[dict, str]:
    stripped = ""
    while state:
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped += prefix
                break
        else:
            break
    return state, stripped


def merge_hints(hints: Hints, extras: dict, metadata: Mapping[str, str]) -> Hints:
    ours = {k[len("cachectl."):]: v for k, v in metadata.items() if k.startswith("cachectl.")}
    arch, source, num_classes = hints.architecture, hints.architecture_source, hints.num_classes
    if ours.get("model"):
        arch, source = ours["model"], "cachectl metadata"
    elif not arch and isinstance(extras.get("arch"), str):
        arch, source = extras["arch"], "the checkpoint's arch field"
    if isinstance(extras.get("num_classes"), int):
        num_classes = extras["num_classes"]
    return Hints(architecture=arch, architecture_source=source, num_classes=num_classes,
                 repo_id=hints.repo_id, cachectl=ours)


def snapshot(folder: Path) -> tuple[Path, Hints]:
    """An HF snapshot folder's weights file and what its config.json and repo name say."""
    for name in SNAPSHOT_WEIGHTS:
        if (folder / name).is_file():
            weights = folder / name
            break
    else:
        raise NotPlain("no weights in the folder")
    hints = Hints(repo_id=repo_id(folder))
    config_path = folder / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except ValueError:
            raise NotPlain("config.json is not JSON") from None
        arch = config.get("architecture") or config.get("model_name") if isinstance(config, dict) else None
        num_classes = config.get("num_classes") if isinstance(config, dict) else None
        hints = replace(hints, architecture=arch if isinstance(arch, str) else None,
                        architecture_source="config.json" if isinstance(arch, str) else None,
                        num_classes=num_classes if isinstance(num_classes, int) else None)
    if not hints.architecture and hints.repo_id and hints.repo_id.startswith("timm/"):
        hints = replace(hints, architecture=hints.repo_id.split("/", 1)[1], architecture_source="the hub repo name")
    return weights, hints


def repo_id(folder: Path) -> str | None:
    # .../models--timm--vit_base_patch16_224.augreg_in21k/snapshots/<rev>
    for part in (folder.resolve().parent.parent.name, folder.name):
        if part.startswith("models--"):
            return "/".join(part[len("models--"):].split("--"))
    return None
