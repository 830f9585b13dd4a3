"""Reading what people save, safely: formats, containers, prefixes, refusals."""
import argparse
import json
import os
import zipfile

import pytest
import timm
import torch
from safetensors.torch import save_file

from cachectl.errors import CheckpointError, UnsafeCheckpointError
from cachectl.reader import read

MODEL = "mobilenetv3_small_050"


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    return timm.create_model(MODEL).state_dict()


def _same(ckpt, state):
    assert set(ckpt.tensors) == set(state)
    for k, v in state.items():
        assert torch.equal(ckpt.tensors[k], v), k


def test_safetensors_zip_and_legacy_read_the_same_tensors(tmp_path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors", metadata={"a": "b"})
    torch.save(state, tmp_path / "w.pth")
    torch.save(state, tmp_path / "w.pt", _use_new_zipfile_serialization=False)
    formats = {}
    for name in ("w.safetensors", "w.pth", "w.pt"):
        ckpt = read(tmp_path / name)
        _same(ckpt, state)
        formats[name] = ckpt.format
    assert formats == {"w.safetensors": "safetensors", "w.pth": "torch-zip", "w.pt": "torch-legacy"}
    assert read(tmp_path / "w.safetensors").metadata == {"a": "b"}


def test_training_checkpoint_unwraps_state_dict_and_prefixes(tmp_path, state):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({
        "epoch": 12, "arch": MODEL, "args": argparse.Namespace(model=MODEL, lr=0.1),
        "state_dict": {"module._orig_mod." + k: v for k, v in state.items()},
        "state_dict_ema": ema, "optimizer": {"state": {}, "param_groups": []},
    }, tmp_path / "train.pth.tar")
    ckpt = read(tmp_path / "train.pth.tar", ema=False)
    assert ckpt.container == "state_dict"
    assert ckpt.other_containers == ("state_dict_ema",)
    assert ckpt.stripped_prefix == "module._orig_mod."
    assert ckpt.hints.architecture == MODEL
    _same(ckpt, state)
    # by default the EMA copy, as timm's own load_checkpoint (use_ema=True) reads it
    ema_ckpt = read(tmp_path / "train.pth.tar")
    assert ema_ckpt.container == "state_dict_ema"
    assert ema_ckpt.other_containers == ("state_dict",)
    _same(ema_ckpt, ema)


def test_model_container_and_model_prefix(tmp_path, state):
    torch.save({"model": {"model." + k: v for k, v in state.items()}}, tmp_path / "deit_style.pth")
    ckpt = read(tmp_path / "deit_style.pth")
    assert (ckpt.container, ckpt.stripped_prefix) == ("model", "model.")
    _same(ckpt, state)


def test_hf_snapshot_folder(tmp_path, state):
    snap = tmp_path / "models--timm--mobilenetv3_small_050.lamb_in1k" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snap / "model.safetensors")
    (snap / "config.json").write_text(json.dumps({"architecture": MODEL, "num_classes": 1000}))
    ckpt = read(snap)
    assert ckpt.weights == snap / "model.safetensors"
    assert ckpt.hints.architecture == MODEL
    assert ckpt.hints.repo_id == "timm/mobilenetv3_small_050.lamb_in1k"
    _same(ckpt, state)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/cachectl-test-pwned",))


def test_pickle_that_runs_code_is_refused_and_never_run(tmp_path, state):
    marker = "/tmp/cachectl-test-pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    torch.save({"state_dict": state, "hook": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError) as err:
        read(tmp_path / "evil.pth")
    message = str(err.value)
    assert "evil.pth" in message and "system" in message
    assert "weights_only=False" in message  # the re-save command, for trusted files only
    assert not os.path.exists(marker)


@pytest.mark.parametrize("name,cut", [("w.pth", 50_000), ("w.safetensors", 50_000), ("w.safetensors", 20)])
def test_truncated_files_name_the_file(tmp_path, state, name, cut):
    full = tmp_path / ("full-" + name)
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, full)
    else:
        torch.save(state, full)
    assert read(full).tensors.keys() == state.keys()  # its header is known to the process now
    cut_path = tmp_path / name
    cut_path.write_bytes(full.read_bytes()[:cut])
    with pytest.raises(CheckpointError) as err:
        read(cut_path)
    assert str(cut_path) in str(err.value)
    assert "truncated" in str(err.value) or "damaged" in str(err.value)


def test_non_checkpoints_are_refused_clearly(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "no_tensors.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        read(tmp_path / "no_tensors.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        read(tmp_path / "missing.pth")


def _safetensors_with_header(path, header, data=b"\0" * 16):
    import json
    import struct

    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, says", [
    ({"w": 5}, "is not an object"),
    ({"w": {"dtype": "F32", "shape": [1048576, 1048576], "data_offsets": [0, 4]}}, "in 4 bytes of data"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "non-negative integers"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "two ascending"),
    ({"w": {"dtype": "F32", "shape": [1]}}, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, "non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
    ({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, "truncated"),
    ({"__metadata__": [1], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "__metadata__"),
])
def test_a_lying_safetensors_header_is_one_clear_error(tmp_path, header, says):
    from cachectl.errors import CheckpointError
    from cachectl.reader import read

    path = _safetensors_with_header(tmp_path / "bad.safetensors", header)
    with pytest.raises(CheckpointError, match=says) as caught:
        read(path)
    assert str(path) in str(caught.value)


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    import os

    from cachectl.errors import CheckpointError
    from cachectl.reader import read

    fifo = tmp_path / "model.pth"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read(fifo)


def test_names_stay_inside_the_store_and_markup_in_paths_is_printed_as_is(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner
    from safetensors.torch import save_file

    from cachectl.cli import main

    (tmp_path / "root").mkdir()
    monkeypatch.setenv("CACHECTL_ROOT", str(tmp_path / "root"))
    weird = tmp_path / "a[" / "]b [bold]"  # the path holds "[/]", which rich would read as markup
    weird.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, weird / "junk.safetensors")
    runner = CliRunner()
    escaped = runner.invoke(main, ["add", str(weird / "junk.safetensors"), "--name", "../../x"])
    assert escaped.exit_code == 1 and "cannot be a name" in escaped.output
    assert not (tmp_path / "x.json").exists() and not list(tmp_path.glob("**/x.json"))
    added = runner.invoke(main, ["add", str(weird / "junk.safetensors")])
    assert "Traceback" not in added.output
    assert added.exception is None or isinstance(added.exception, SystemExit), added.exception
    listed = runner.invoke(main, ["list"])
    assert listed.exit_code == 0, listed.output
    assert "junk@1" in listed.output
    shown = json.loads(runner.invoke(main, ["show", "junk", "--json"]).output)
    assert shown["origin"].endswith("a[/]b [bold]/junk.safetensors")
    text = runner.invoke(main, ["show", "junk"])
    assert text.exit_code == 0 and "a[/]b [bold]/junk.safetensors" in text.output


def _tensors(obj, path=""):
    """Every tensor in a loaded object, by where it lies in it."""
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in _tensors(value, "%s/%s" % (path, key)).items()}


def test_a_zip_file_is_mapped_to_exactly_the_tensors_torch_loads(tmp_path, state):
    """cachectl maps torch zip files with its own unpickler (torch's was most of a
    conversion's fixed cost): every tensor must be torch's, bit for bit, with the same
    dtype, shape, strides and place in the file, however the file shares its storages."""
    from cachectl.reader import _mapped_zip, _torch_load

    base = torch.arange(24, dtype=torch.float32)
    weights = {
        **state,
        "tied.a": state["conv_stem.weight"], "tied.b": state["conv_stem.weight"],  # one storage, two names
        "transposed": torch.randn(5, 7).t(),  # not contiguous
        "slice": base[6:18].view(3, 4),  # a view at an offset into a shared storage
        "whole": base,
        "half": torch.randn(4, 3).half(), "bf16": torch.randn(3).bfloat16(), "long": torch.arange(5),
        "mask": torch.rand(4) > 0.5, "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
        "param": torch.nn.Parameter(torch.randn(2, 2)),
    }
    path = tmp_path / "train.pth"
    torch.save({"epoch": 3, "args": argparse.Namespace(model=MODEL), "state_dict": weights,
                "state_dict_ema": {k: v for k, v in state.items()},
                "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}},
               path)
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        mapped = _mapped_zip(z, f.fileno(), path, path.stat().st_size)
    assert mapped is not None, "a plain torch.save file must not need torch's unpickler"
    ours, base_address = mapped
    theirs = _tensors(_torch_load(path, path, mmap=True))
    ours = _tensors(ours)
    assert set(ours) == set(theirs) and len(ours) > len(state) * 2
    data = path.read_bytes()
    for key, t in theirs.items():
        o = ours[key]
        assert (o.dtype, o.shape, o.stride()) == (t.dtype, t.shape, t.stride()), key
        assert torch.equal(o, t), key
        if o.numel() and o.is_contiguous():  # where the reader says the bytes lie, they lie
            at = o.data_ptr() - base_address
            assert data[at:at + o.numel() * o.element_size()] == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), key
    assert ours["/state_dict/tied.a"].data_ptr() == ours["/state_dict/tied.b"].data_ptr()
    # what the conversion reads: the EMA copy, as timm's own loader, and where its bytes lie
    ckpt = read(path)
    assert ckpt.container == "state_dict_ema" and ckpt.span is not None
    for key, t in ckpt.tensors.items():
        at = ckpt.span(t)
        assert at is not None and data[at:at + t.numel() * t.element_size()] == t.view(-1).view(torch.uint8).numpy().tobytes(), key


def test_what_the_mapped_reader_does_not_know_torch_reads(tmp_path):
    """A tensor that shows more elements than it stores (expand) is not a plain view:
    torch's loader reads the file, and the reader gives the same tensors as before."""
    from cachectl.reader import _mapped_zip

    path = tmp_path / "expanded.pth"
    torch.save({"w": torch.arange(3.0).expand(4, 3), "b": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        assert _mapped_zip(z, f.fileno(), path, path.stat().st_size) is None
    ckpt = read(path)
    assert torch.equal(ckpt.tensors["w"], torch.arange(3.0).expand(4, 3)) and torch.equal(ckpt.tensors["b"], torch.ones(2))
