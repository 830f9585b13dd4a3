"""A hostile corpus, generated where the test runs it (no binary is checked in).

`build(folder, scale)` writes every kind of input a shared inbox can receive from someone
careless or malicious, and returns the cases. A pickle payload, if it ever ran, creates a
marker file in `folder/ran/`: counting those files is counting code executions.

Run by hand: python -m tests.hostile DIR [SCALE]   (prints one line per case)
"""
from __future__ import annotations

import io
import json
import os
import pickle
import socket
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

MARKERS = "ran"


@dataclass(frozen=True)
class Case:
    name: str  # short, unique: what the summary calls it
    path: Path  # what is handed to cachectl (a file, a link, a special file or a snapshot folder)
    kind: str  # pickle | safetensors | torch-zip | bomb | nesting | special | name | scale | sparse
    valid: bool = False  # a readable checkpoint (may still be no timm model): exit 0 is allowed


class _RunsCode:
    """Unpickled with weights_only=False, this runs a shell command that leaves a marker."""

    def __init__(self, marker: Path, how: str = "system"):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "eval":
            return (eval, ("open(%r, 'w').close()" % str(self.marker),))
        if self.how == "exec":
            return (exec, ("import pathlib; pathlib.Path(%r).touch()" % str(self.marker),))
        return (os.system, ("touch '%s'" % self.marker,))


def _state(n: int = 4) -> dict:
    return {"w%d" % i: torch.arange(i + 3, dtype=torch.float32) for i in range(n)}


def _st_raw(path: Path, header, data: bytes = b"", raw_header: bytes | None = None) -> None:
    """A safetensors file with exactly this header (any JSON, or raw bytes) and data."""
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _entry(shape, start: int, end: int, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def _rezip(src: Path, dst: Path, change) -> None:
    """Copy the torch zip `src` to `dst`, letting `change(name, data)` edit or drop (None) records."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for info in z.infolist():
            data = change(info.filename, z.read(info))
            if data is not None:
                out.writestr(info, data)


def build(folder: Path, scale: int = 1) -> list[Case]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ran = folder / MARKERS
    ran.mkdir(exist_ok=True)
    cases: list[Case] = []

    def add(name: str, kind: str, path: Path | None = None, valid: bool = False) -> Path:
        cases.append(Case(name, path or folder / name, kind, valid))
        return cases[-1].path

    # -- pickles that would run code, through every reader path
    for how in ("system", "eval", "exec"):
        evil = {"state_dict": _state(), "payload": _RunsCode(ran / ("zip-" + how), how)}
        torch.save(evil, add("payload_zip_%s.pth" % how, "pickle"))
    evil = {"state_dict": _state(), "payload": _RunsCode(ran / "legacy")}
    torch.save(evil, add("payload_legacy.pth", "pickle"), _use_new_zipfile_serialization=False)
    for proto in (2, 4, 5):
        with open(add("payload_plain_p%d.pt" % proto, "pickle"), "wb") as f:
            pickle.dump({"model": _RunsCode(ran / ("plain%d" % proto))}, f, protocol=proto)
    torch.save({"state_dict": _state(), "x": _RunsCode(ran / "bin")}, add("pytorch_model.bin", "pickle"))
    torch.save({"state_dict": _state(), "x": _RunsCode(ran / "ckpt")}, add("payload.ckpt", "pickle"))
    torch.save({"state_dict": _state(), "x": _RunsCode(ran / "tar")}, add("payload.pth.tar", "pickle"))
    snapshot = folder / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 1000}))
    torch.save({"state_dict": _state(), "x": _RunsCode(ran / "snapshot")}, snapshot / "pytorch_model.bin")
    add("payload_snapshot", "pickle", snapshot)
    # a payload hidden in a torch zip's data.pkl behind a valid-looking archive
    clean = folder / ".clean.pth"
    torch.save(_state(), clean)
    payload = pickle.dumps({"w0": _RunsCode(ran / "datapkl")}, protocol=2)
    _rezip(clean, add("payload_datapkl.pth", "pickle"),
           lambda name, data: payload if name.endswith("data.pkl") else data)
    # numpy's allowed loader asked for 1 TiB (an allowed global with hostile arguments)
    import numpy as np

    class _Huge:
        def __reduce__(self):
            return (np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct,
                    (np.ndarray, (2 ** 40,), b"b"))

    with open(add("numpy_1tib.pth", "pickle"), "wb") as f:
        pickle.dump({"state_dict": _state(), "metric": _Huge()}, f, protocol=2)
    # a valid pickle of the wrong types
    torch.save([1, 2, 3], add("a_list.pth", "pickle"))
    torch.save({"state_dict": {"a": 1, "b": "x"}}, add("no_tensors.pth", "pickle"))
    torch.save({"arch": 7, "num_classes": "many", "state_dict": _state()}, add("odd_extras.pth", "pickle",
                                                                                 valid=True))

    # -- safetensors whose header lies
    good = folder / "good.safetensors"
    save_file(_state(), good)
    add("good.safetensors", "safetensors", good, valid=True)
    four = struct.pack("<f", 1.0)
    st = {
        "st_not_json": (None, b"", b"{not json at all"),
        "st_bad_utf8": (None, b"", b"{\"\xff\xfe\": 1}"),
        "st_not_object": ([1, 2, 3], b"", None),
        "st_string_header": ("hello", b"", None),
        "st_entry_int": ({"a": 5}, four, None),
        "st_entry_str": ({"a": "tensor"}, four, None),
        "st_entry_null": ({"a": None}, four, None),
        "st_no_offsets": ({"a": {"dtype": "F32", "shape": [1]}}, four, None),
        "st_no_shape": ({"a": {"dtype": "F32", "data_offsets": [0, 4]}}, four, None),
        "st_no_dtype": ({"a": {"shape": [1], "data_offsets": [0, 4]}}, four, None),
        "st_bad_dtype": ({"a": _entry([1], 0, 4, "Q99")}, four, None),
        "st_dtype_list": ({"a": _entry([1], 0, 4, ["F32"])}, four, None),
        "st_offsets_past_end": ({"a": _entry([1024], 0, 4096)}, four, None),
        "st_offsets_huge": ({"a": _entry([1], 2 ** 62, 2 ** 62 + 4)}, four, None),
        "st_offsets_negative": ({"a": _entry([1], -4, 0)}, four, None),
        "st_offsets_reversed": ({"a": _entry([0], 4, 0)}, four, None),
        "st_offsets_floats": ({"a": _entry([1], 0.0, 4.0)}, four, None),
        "st_offsets_three": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, four, None),
        "st_overlap": ({"a": _entry([2], 0, 8), "b": _entry([2], 4, 12)}, four * 3, None),
        "st_shape_nan": (None, four, b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'),
        "st_shape_inf": (None, four, b'{"a": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 4]}}'),
        "st_shape_huge": ({"a": _entry([2 ** 20, 2 ** 20], 0, 4)}, four, None),
        "st_shape_2e64": ({"a": _entry([2 ** 64 + 1], 0, 4)}, four, None),
        "st_shape_negative": ({"a": _entry([-1], 0, 4)}, four, None),
        "st_shape_negative_pair": ({"a": _entry([-1, -1], 0, 4)}, four, None),
        "st_shape_bool": ({"a": _entry([True], 0, 4)}, four, None),
        "st_shape_string": ({"a": _entry("4", 0, 4)}, four, None),
        "st_shape_short": ({"a": _entry([3], 0, 4)}, four, None),
        "st_metadata_list": ({"__metadata__": [1], "a": _entry([1], 0, 4)}, four, None),
        "st_metadata_nested": ({"__metadata__": {"k": {"deep": [1]}}, "a": _entry([1], 0, 4)}, four, None),
        "st_header_cut": (None, b"", b'{"a": {"dtype": "F32", "shape": [1], "data_off'),
        "st_duplicate_keys": (None, four, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
                                          b' "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'),
        "st_deep_nesting": (None, four, b"[" * 200000 + b"]" * 200000),
        "st_deep_metadata": (None, four, b'{"__metadata__": ' + b'{"a": ' * 100000 + b"1" + b"}" * 100001),
    }
    for name, (header, data, raw) in st.items():
        _st_raw(add(name + ".safetensors", "safetensors" if "nesting" not in name and "deep" not in name
                    else "nesting"), header, data, raw)
    (folder / "st_length_huge.safetensors").write_bytes(struct.pack("<Q", 2 ** 63) + b"{}")
    add("st_length_huge.safetensors", "safetensors")
    (folder / "st_length_past_end.safetensors").write_bytes(struct.pack("<Q", 1000) + b'{"a": 1}')
    add("st_length_past_end.safetensors", "safetensors")
    (folder / "st_empty.safetensors").write_bytes(b"")
    add("st_empty.safetensors", "safetensors")
    _st_raw(add("st_zero_size_tensor.safetensors", "safetensors", valid=True),
            {"a": _entry([0, 1 << 30], 0, 0), "b": _entry([1], 0, 4)}, four)

    # -- torch zip files whose records lie
    _rezip(clean, add("zip_record_short.pth", "torch-zip"),
           lambda name, data: data[:3] if "/data/0" in name else data)
    _rezip(clean, add("zip_record_missing.pth", "torch-zip"),
           lambda name, data: None if "/data/0" in name else data)
    _rezip(clean, add("zip_no_datapkl.pth", "torch-zip"),
           lambda name, data: None if name.endswith("data.pkl") else data)
    _rezip(clean, add("zip_datapkl_junk.pth", "torch-zip"),
           lambda name, data: b"\x80\x02junk" if name.endswith("data.pkl") else data)
    _rezip(clean, add("zip_bad_byteorder.pth", "torch-zip"),
           lambda name, data: b"sideways" if name.endswith("byteorder") else data)
    data = clean.read_bytes()
    add("zip_truncated.pth", "torch-zip").write_bytes(data[: len(data) // 2])
    add("zip_crc_flipped.pth", "torch-zip").write_bytes(data[:-30] + bytes(b ^ 0xFF for b in data[-30:-22]) + data[-22:])
    # a tensor whose view asks for more than its storage holds: size larger than the record
    lying = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, lying)
    lying_path = folder / ".lying.pth"
    lying_path.write_bytes(lying.getvalue())
    with zipfile.ZipFile(lying_path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    # the pickled size tuple is (1,): BININT1 1, TUPLE1; make it (2**40,) with a BINUNICODE-free patch
    wide = pkl.replace(b"K\x01\x85q", b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85q", 1) if b"K\x01\x85q" in pkl else pkl
    _rezip(lying_path, add("zip_shape_past_storage.pth", "torch-zip"),
           lambda name, d: wide if name.endswith("data.pkl") else d)
    # zero-stride: one float saved, seen as 2**28 of them (1 GiB if materialised)
    torch.save({"w": torch.zeros(1).expand(2 ** 28), "b": torch.ones(3)}, add("zero_stride.pth", "torch-zip"))
    torch.save({"w": torch.zeros(4).as_strided((2 ** 20, 2 ** 20), (0, 0))}, add("zero_stride_1t.pth", "torch-zip"))

    # -- zip bombs: records that inflate far past the file
    bomb = folder / "zip_bomb_record.pth"
    with zipfile.ZipFile(clean) as z, zipfile.ZipFile(bomb, "w") as out:
        for info in z.infolist():
            d = z.read(info)
            if "/data/0" in info.filename:
                out.writestr(info.filename, b"\0" * (64 << 20 if scale < 4 else 1 << 30), zipfile.ZIP_DEFLATED)
            else:
                out.writestr(info, d)
    add(bomb.name, "bomb")
    with zipfile.ZipFile(clean) as z, zipfile.ZipFile(add("zip_bomb_datapkl.pth", "bomb"), "w") as out:
        for info in z.infolist():
            d = z.read(info)
            if info.filename.endswith("data.pkl"):
                out.writestr(info.filename, b"(" * (80 << 20), zipfile.ZIP_DEFLATED)  # MARK after MARK
            else:
                out.writestr(info, d)
    with zipfile.ZipFile(add("zip_many_members.pth", "bomb"), "w") as out:
        out.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        for i in range(20000 * scale):
            out.writestr("archive/junk/%d" % i, b"")

    # -- deep nesting in pickles
    deep = b"\x80\x02" + b"}q\x00(X\x01\x00\x00\x00a" * 50000 + b"K\x01" + b"u" * 50000 + b"."
    add("pickle_deep_dicts.pth", "nesting").write_bytes(deep)
    add("pickle_deep_lists.pth", "nesting").write_bytes(b"\x80\x02" + b"(" * 100000 + b"l" * 100000 + b".")
    nested = {"w": torch.ones(2)}
    for _ in range(300):
        nested = {"state_dict": nested}
    torch.save(nested, add("torch_deep_dicts.pth", "nesting"))

    # -- special files and links
    fifo = add("fifo.pth", "special")
    os.mkfifo(fifo)
    os.mkfifo(folder / "fifo.safetensors")
    add("fifo.safetensors", "special")
    sock = add("sock.pth", "special")
    try:
        s = socket.socket(socket.AF_UNIX)
        cwd = os.getcwd()
        os.chdir(folder)  # a socket's path may be longer than sun_path allows: bind it relatively
        try:
            s.bind(sock.name)
        finally:
            os.chdir(cwd)
        s.close()
    except OSError:
        cases.pop()
    os.symlink("/dev/zero", add("link_to_dev_zero.pth", "special"))
    os.symlink("/dev/urandom", add("link_to_urandom.safetensors", "special"))
    os.symlink("/etc/shadow" if os.path.exists("/etc/shadow") else "/etc/passwd", add("link_out.pth", "special"))
    os.symlink("loop_b.pth", folder / "loop_a.pth")
    os.symlink("loop_a.pth", add("loop_b.pth", "special"))
    os.symlink("/nonexistent/dangling", add("dangling.pth", "special"))
    os.mkdir(add("a_folder.pth", "special"))
    out_snapshot = folder / "hub" / "models--timm--resnet18.out" / "snapshots" / "0123abcd"
    out_snapshot.mkdir(parents=True)
    os.symlink("/dev/zero", out_snapshot / "model.safetensors")
    add("snapshot_link_to_dev_zero", "special", out_snapshot)

    # -- names people cannot type: newlines, terminal escapes, rich markup
    for name in ("new\nline.pth", "\x1b[31mred\x1b[0m\x1b]0;pwned\x07.pth", "a[/]b.pth", "[bold red]x[/].pth",
                 "tab\tand\rcr.pth", "..pth", "-rf.pth", "\u202eevil.pth"):
        path = add(name, "name", valid=True)
        path.parent.mkdir(exist_ok=True)  # "a[/]b.pth" is b.pth in a folder named "a["
        torch.save(_state(2), path)

    # -- scale: time and memory must be linear in the number of tensors
    n = 100000 * scale
    tiny = torch.zeros(n, dtype=torch.float32)
    save_file({"t%06d" % i: tiny[i:i + 1].clone() for i in range(n)}, add("many_tensors.safetensors", "scale",
                                                                         valid=True))
    torch.save({"t%05d" % i: torch.zeros(1) for i in range(20000 * scale)}, add("many_tensors.pth", "scale",
                                                                                   valid=True))

    # -- sparse: a big file of holes
    sparse = add("sparse.safetensors", "sparse", valid=True)
    size = (256 << 20) * scale
    header = json.dumps({"big": _entry([size // 4], 0, size)}).encode()
    header += b" " * (-len(header) % 8)
    with open(sparse, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size)
    with open(add("sparse_junk.pth", "sparse"), "wb") as f:
        f.truncate(size)

    clean.unlink()
    lying_path.unlink()
    return cases


def executions(folder: Path) -> list[str]:
    """The markers payloads left: each one is code from a checkpoint that ran."""
    return sorted(p.name for p in (Path(folder) / MARKERS).iterdir())


if __name__ == "__main__":
    # python -m tests.hostile DIR [SCALE] [--json]: one line per case (JSON for the test)
    made = build(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    for case in made:
        if "--json" in sys.argv:
            print(json.dumps({"name": case.name, "path": str(case.path), "kind": case.kind, "valid": case.valid}))
        else:
            print("%-11s %r" % (case.kind, case.name))
