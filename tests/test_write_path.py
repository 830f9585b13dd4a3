"""The write path: renamed tensors are one run copied from the source, dropped and filled buffers leave the
rest untouched, and every output is a valid safetensors file that loads strictly, its
tensors equal to the source's. Installed timm only (fast tier)."""
import json
import struct

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from cachectl.cache import Cache
from cachectl.convert import convert
from cachectl.errors import CachectlError
from cachectl.reader import read
from cachectl.safetensors_io import Recipe, write
from cachectl.store import sha256_file
from cachectl.target import Target


@pytest.fixture(scope="module")
def target():
    with Target() as t:
        yield t


def _state(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}


def _data_region(path) -> bytes:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 + n:]


def _loads_strictly(path, model: dict) -> dict[str, torch.Tensor]:
    loaded = load_file(path)  # safetensors' own checks: offsets cover the data, no gaps
    timm.create_model(model["name"], **model["kwargs"]).load_state_dict(loaded, strict=True)
    return loaded


def test_renamed_safetensors_is_a_new_header_and_one_run_of_its_data(target, tmp_path):
    state = _state("mobilenetv3_small_050")
    src = tmp_path / "net.safetensors"
    save_file({"module." + k: v for k, v in state.items()}, src)  # as DataParallel saves it

    out = tmp_path / "out.safetensors"
    result = convert(src, out, target)

    assert result.source_runs == 1
    assert _data_region(out) == _data_region(src)  # the whole data region, byte for byte
    loaded = _loads_strictly(out, {"name": result.model.name, "kwargs": dict(result.model.kwargs)})
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    header = json.loads(out.read_bytes()[8:8 + struct.unpack("<Q", out.read_bytes()[:8])[0]])
    assert header["__metadata__"]["cachectl.source_sha256"] == sha256_file(src)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_dropped_and_filled_buffers_leave_every_other_tensor_as_it_was(target, tmp_path, fmt):
    model = timm.create_model("levit_128s")
    state = _state("levit_128s")
    # as older releases saved it: the bias index tables the target recomputes, and no
    # batch counters (which the target saves and a fresh model supplies)
    stale = {k: v.contiguous() for k, v in model.named_buffers() if k.endswith("attention_bias_idxs")}
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert stale and counters
    source = {**{k: v for k, v in state.items() if k not in counters}, **stale}
    src = tmp_path / ("levit." + fmt)
    save_file(source, src) if fmt == "safetensors" else torch.save(source, src)

    out = tmp_path / "out.safetensors"
    result = convert(src, out, target)

    assert any(s.startswith("drop %d buffers" % len(stale)) for s in result.steps), result.steps
    assert any(s.startswith("fill %d buffers" % len(counters)) for s in result.steps), result.steps
    loaded = _loads_strictly(out, {"name": result.model.name, "kwargs": dict(result.model.kwargs)})
    assert loaded.keys() == state.keys()
    for k, v in state.items():  # kept tensors are the source's; filled ones a fresh model's
        assert torch.equal(loaded[k], v), k
    assert result.source_runs > 0
    if fmt == "safetensors":
        # kept neighbours are copied together: at most one copy more than the gaps left
        assert result.source_runs <= len(stale) + 1


def test_a_source_cut_short_while_it_is_converted_is_refused_and_nothing_is_left(tmp_path):
    # a user's file rewritten between the read and the write: its tensors' bytes are read
    # from the file at write time, so the file ending early must stop the write, not
    # publish a file with a hole nor leave a temporary behind
    state = _state("levit_128s")
    src = tmp_path / "levit.safetensors"
    save_file(state, src)
    ckpt = read(src)
    with open(src, "r+b") as f:
        f.truncate(src.stat().st_size // 2)
    out = tmp_path / "out" / "levit.safetensors"
    out.parent.mkdir()
    with pytest.raises(ValueError, match="levit.safetensors ends before byte .* changed while it was converted"):
        write(out, ckpt.tensors, {}, source=ckpt.weights, span=ckpt.span)
    assert list(out.parent.iterdir()) == []


def _levit_without_counters(tmp_path):
    """A levit saved with its batch counters left out: converting it copies the saved
    tensors from the source and fills the counters from memory."""
    state = _state("levit_128s")
    kept = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(kept) < len(state)
    src = tmp_path / "levit.safetensors"
    save_file({"module." + k: v for k, v in kept.items()}, src)
    return src, kept


def _converted(cache, added):
    (link,) = [lk for lk in added.links if lk.env == "default"]
    converted = cache.store.get_converted(link.converted)
    return converted, cache.store.converted_path(converted)


def test_the_store_names_a_converted_file_by_its_recipe_never_reading_it_back(tmp_path, monkeypatch):
    # hashing the output cost as much as the kernel's copy of it: the name is the sha256 of
    # how the file is made of the stored source, which fixes every byte of it
    import hashlib
    import types

    from cachectl import safetensors_io

    class Counted:
        def __init__(self, data=b""):
            self.h = hashlib.sha256(data)
            hashed.append(len(data))

        def update(self, data):
            hashed.append(memoryview(data).nbytes)
            self.h.update(data)

        def hexdigest(self):
            return self.h.hexdigest()

    src, kept = _levit_without_counters(tmp_path)
    made = []
    for i in range(2):
        with Cache(tmp_path / ("root%d" % i)) as cache:
            hashed: list[int] = []
            monkeypatch.setattr(safetensors_io, "hashlib", types.SimpleNamespace(sha256=Counted))
            added = cache.add(src)
            monkeypatch.undo()
            converted, path = _converted(cache, added)
            recipe = Recipe.from_json(converted.recipe)
            # hashed: the header and the filled counters, never the bytes copied from the source
            header = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
            computed = sum(size for at, size in recipe.runs if isinstance(at, str))
            assert 0 < sum(hashed) <= header + computed + 4096 < path.stat().st_size // 10
            assert converted.sha256 == recipe.name(added.source.sha256) != sha256_file(path)
            assert {type(at) for at, _ in recipe.runs} == {int, str}  # copied runs and filled counters
            manifest = json.loads((cache.store.converted / ("%s.json" % converted.id)).read_text())
            assert manifest["format"] == 2 and manifest["recipe"] == converted.recipe
            loaded = _loads_strictly(path, {"name": converted.model, "kwargs": converted.model_kwargs})
            assert all(torch.equal(loaded[k], v) for k, v in kept.items())
            assert cache.verify() == []
            made.append((converted.sha256, path.read_bytes()))
    assert made[0] == made[1]  # another store, the same recipe: the same name and the same bytes


def _flip(path, at: int) -> None:
    path.chmod(0o644)  # blobs are read-only
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["header", "copied", "from memory", "cut short", "recipe", "source"])
def test_verify_finds_a_converted_file_that_its_recipe_does_not_make(tmp_path, damage):
    src, _ = _levit_without_counters(tmp_path)
    with Cache(tmp_path / "root") as cache:
        converted, path = _converted(cache, cache.add(src))
        recipe = Recipe.from_json(converted.recipe)
        runs, at = [], 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
        for where, size in recipe.runs:  # where each run lies in the output
            runs.append((where, at))
            at += size
        manifest = cache.store.converted / ("%s.json" % converted.id)
        if damage == "header":
            _flip(path, 20)
        elif damage == "copied":
            _flip(path, next(out for where, out in runs if isinstance(where, int)) + 3)
        elif damage == "from memory":
            _flip(path, next(out for where, out in runs if isinstance(where, str)))
        elif damage == "cut short":
            path.chmod(0o644)
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size - 1)
        elif damage == "recipe":
            raw = json.loads(manifest.read_text())
            raw["recipe"]["runs"][0][1] += 1
            manifest.write_text(json.dumps(raw))
        else:  # a byte the converted file copied: the source is damaged, the converted file may not be
            source = cache.store.blob_path(converted.source)
            _flip(source, next(where for where, _ in recipe.runs if isinstance(where, int)) + 3)
            damaged, problem = cache.verify()
            assert damaged.startswith("%s (source of levit@1): damaged" % source), damaged
        if damage != "source":
            (problem,) = cache.verify()
    expected = {
        "header": "%s (converted %s): damaged, its header differs" % (path, converted.id),
        "copied": "%s (converted %s): damaged, bytes" % (path, converted.id),
        "from memory": "%s (converted %s): damaged, bytes" % (path, converted.id),
        "cut short": "%s (converted %s): damaged, it is" % (path, converted.id),
        "recipe": "%s: the recipe of %s is damaged (it does not give the file's name)" % (manifest, path),
        "source": "%s (converted %s): cannot be checked while its source %s is damaged" % (
            path, converted.id, cache.store.blob_path(converted.source)),
    }[damage]
    assert problem.startswith(expected), problem
    if damage in ("copied", "from memory"):
        assert ("written from memory" in problem) == (damage == "from memory"), problem


def test_add_reads_a_new_pth_once_without_torchs_unpickler_and_the_same_bytes_again_not_at_all(tmp_path, monkeypatch):
    # the daemon's backlog: torch's unpickler was most of a small file's time, so the
    # watched file's headers are read without it, the stored copy's tensors once, mapped
    # by cachectl's own unpickler (torch's only where that one does not know the file)
    from cachectl import reader

    src = tmp_path / "net.pth"
    torch.save(_state("mobilenetv3_small_050"), src)
    real_load, real_open, loads, reads = torch.load, reader._read_open, [], []

    def counted_load(*args, **kwargs):
        loads.append(args[0])
        return real_load(*args, **kwargs)

    def counted_read(path, weights, *args, **kwargs):
        reads.append(weights)
        return real_open(path, weights, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted_load)
    monkeypatch.setattr(reader, "_read_open", counted_read)
    with Cache(tmp_path / "root") as cache:
        added = cache.add(src)
        assert [lk.error for lk in added.links] == [None]
        assert len(reads) == 1 and loads == []
        assert cache.store.blobs in reads[0].parents  # the stored copy, not the watched file
        again = cache.add(src)
        assert not again.new_version and len(reads) == 1  # linked already: no tensor is read
        assert cache.verify() == []


def test_add_refuses_what_only_torch_finds_wrong_and_keeps_nothing_of_it(tmp_path):
    # its headers add up (records of the right sizes), but they are compressed, which
    # torch cannot map: refused after the store took the bytes, and the bytes go again
    import zipfile

    clean, src = tmp_path / "clean.pth", tmp_path / "deflated.pth"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, clean)
    with zipfile.ZipFile(clean) as z, zipfile.ZipFile(src, "w") as out:
        for info in z.infolist():
            out.writestr(info.filename, z.read(info), zipfile.ZIP_DEFLATED)
    before = src.read_bytes()

    with Cache(tmp_path / "root") as cache:
        with pytest.raises(CachectlError) as refused:
            cache.add(src)
        assert "deflated.pth" in str(refused.value) and "damaged" in str(refused.value)
        assert [p for p in cache.store.blobs.rglob("*") if p.is_file()] == []
        assert cache.store.all_versions() == [] and cache.scan().sources == {}
    assert src.read_bytes() == before


def test_a_killed_process_scratch_folder_is_removed_by_the_next_target():
    import signal
    import subprocess
    import sys
    from pathlib import Path

    hold = "from cachectl.target import Target; t = Target(); print(t._tmp, flush=True); import time; time.sleep(120)"
    killed = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    living = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        dead_tmp, live_tmp = Path(killed.stdout.readline().strip()), Path(living.stdout.readline().strip())
        killed.send_signal(signal.SIGKILL)  # no finalizer runs: the folder stays behind
        killed.wait()
        assert dead_tmp.is_dir() and live_tmp.is_dir()
        with Target():
            assert not dead_tmp.exists()
            assert live_tmp.is_dir()  # another process's folder, in use
    finally:
        living.kill()
        living.wait()
    with Target():
        assert not live_tmp.exists()


def test_a_process_forked_after_a_write_writes_too(tmp_path):
    # the daemon's and the tests' children are forked from a process that has written before
    import os
    import signal
    import time

    from cachectl import safetensors_io

    big = {"w": torch.ones(3 * 1024 * 1024)}  # 12 MB: more than one writeback step
    safetensors_io.write(tmp_path / "parent.safetensors", big, {})
    pid = os.fork()
    if pid == 0:
        try:
            safetensors_io.write(tmp_path / "child.safetensors", big, {})
        finally:
            os._exit(0)
    end = time.monotonic() + 60
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's write hung")
        time.sleep(0.05)
    assert torch.equal(load_file(tmp_path / "child.safetensors")["w"], big["w"])
