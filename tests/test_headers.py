"""Commands that answer at once: headers read without torch, `loads as-is` from the catalog,
and no torch or timm imported by inspect, list, show, pins, status, path or --help."""
import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from benchmarks.store_scan import build as fill_store
from cachectl.catalog import Catalog
from cachectl.cli import main
from cachectl.headers import NotPlain, read_header
from cachectl.identify import find, part_of
from cachectl.inspection import from_catalog, from_target, timm_release
from cachectl.reader import read
from cachectl.target import Target
from conftest import INSTALLED, make_checkpoint

MODEL = "mobilenetv3_small_050"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One state dict saved every way people save it."""
    d = tmp_path_factory.mktemp("headers")
    torch.manual_seed(0)
    model = timm.create_model(MODEL)
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, d / "w.safetensors", metadata={"cachectl.model": MODEL})
    torch.save(state, d / "w.pth")
    torch.save(state, d / "w.pt", _use_new_zipfile_serialization=False)
    torch.save(dict(model.named_parameters()), d / "params.pth")  # nn.Parameter records
    torch.save({"epoch": 3, "arch": MODEL, "args": argparse.Namespace(model=MODEL, lr=0.1),
                "metric": np.float64(0.5), "history": np.zeros(3),
                "state_dict": {"module._orig_mod." + k: v for k, v in state.items()},
                "state_dict_ema": state, "optimizer": {"state": {}, "param_groups": []}}, d / "train.pth.tar")
    snap = d / ("models--timm--%s.lamb_in1k" % MODEL) / "snapshots" / "abc"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snap / "model.safetensors")
    (snap / "config.json").write_text(json.dumps({"architecture": MODEL, "num_classes": 1000}))
    return d, ["w.safetensors", "w.pth", "w.pt", "params.pth", "train.pth.tar", str(snap.relative_to(d))]


@pytest.mark.parametrize("ema", [True, False])
def test_headers_say_what_the_reader_says(files, ema):
    folder, names = files
    for name in names:
        header, ckpt = read_header(folder / name, ema=ema), read(folder / name, ema=ema)
        assert (header.format, header.layout, header.container, header.other_containers, header.stripped_prefix,
                dict(header.metadata)) == (ckpt.format, ckpt.layout, ckpt.container, ckpt.other_containers,
                                           ckpt.stripped_prefix, dict(ckpt.metadata)), name
        assert dataclasses.asdict(header.hints) == dataclasses.asdict(ckpt.hints), name


def test_a_pickle_that_would_run_code_is_not_run_and_inspect_refuses_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch %s" % marker,))

    torch.save({"weight": torch.zeros(2), "x": Evil()}, tmp_path / "evil.pth")
    torch.save({"weight": torch.zeros(2), "x": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=False)
    for name in ("evil.pth", "evil.pt"):
        with pytest.raises(NotPlain, match="posix.system|os.system"):
            read_header(tmp_path / name)
        result = CliRunner().invoke(main, ["inspect", str(tmp_path / name)])
        assert result.exit_code != 0 and "unpickling it would run code" in result.output
        assert not marker.exists()


def test_damaged_files_are_left_to_the_reader_which_names_them(files, tmp_path):
    folder, _ = files
    for name, keep in (("w.pth", 50_000), ("w.pt", 50_000), ("w.safetensors", 50_000), ("w.safetensors", 20)):
        cut = tmp_path / ("cut-%d-%s" % (keep, name))
        cut.write_bytes((folder / name).read_bytes()[:keep])
        with pytest.raises(NotPlain):
            read_header(cut)
        result = CliRunner().invoke(main, ["inspect", str(cut)])
        assert result.exit_code != 0 and str(cut) in result.output and "Traceback" not in result.output
    # a zip whose data.pkl names a storage that is not in it
    with zipfile.ZipFile(folder / "w.pth") as z, zipfile.ZipFile(tmp_path / "hollow.pth", "w") as out:
        for info in z.infolist():
            if "/data/" not in info.filename:
                out.writestr(info, z.read(info))
    with pytest.raises(NotPlain, match="missing or cut short"):
        read_header(tmp_path / "hollow.pth")


def _both(path, model=None):
    """(catalog's answer, target's answer) for each timm model in `path`, in the installed timm."""
    catalog = Catalog.load()
    ckpt = read_header(path)
    release = timm_release(None)
    with Target(None) as target:
        out = []
        for tag in find(ckpt, catalog, model=model).tags:
            part = part_of(ckpt, tag.prefix)
            out.append((from_catalog(tag, part, catalog, release, model), from_target(tag, part, target, catalog, model)))
    return out


@pytest.mark.parametrize("model, kwargs", [("resnet18", None), ("resnet18", {"num_classes": 10}),
                                           ("resnet18", {"num_classes": 0}), ("deit_tiny_patch16_224", None)])
def test_loads_as_is_from_the_catalog_is_what_the_target_answers(model, kwargs):
    made = make_checkpoint(INSTALLED, model, kwargs)
    for from_cat, from_tgt in _both(made.path):
        assert from_cat is not None
        assert from_cat == from_tgt
        assert from_cat.loads


def test_a_layout_the_installed_timm_does_not_make_is_explained_alike(tmp_path):
    made = make_checkpoint(INSTALLED, "resnet18")
    state = torch.load(made.path, weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    state["fc.weight"] = torch.zeros(7, 512)
    torch.save(state, tmp_path / "resnet18_pruned.pth")
    [(from_cat, from_tgt)] = _both(tmp_path / "resnet18_pruned.pth")
    assert from_cat == from_tgt
    assert not from_cat.loads and "missing layer4.1." in from_cat.problem


def test_files_alike_but_for_their_names_are_each_named_by_their_own(tmp_path):
    """Byte-identical headers are parsed once and identification keeps its answers per
    layout, yet each file's own name still picks between look-alikes, file by file: a
    name seen first is never the answer for the next file."""
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model("tf_efficientnet_b0").state_dict().items()}
    first = tmp_path / "tf_efficientnet_b0.safetensors"
    save_file(state, first)
    catalog = Catalog.load()
    answers, layouts = [], set()
    for name in ("tf_efficientnet_b0", "model_best", "efficientnet_b0", "tf_efficientnet_b0"):
        path = tmp_path / (name + ".safetensors")
        if not path.exists():
            shutil.copyfile(first, path)
        ckpt = read(path)
        layouts.add(id(ckpt.layout))
        tag = find(ckpt, catalog).tags[0]
        answers.append((tag.best.architecture, tag.chosen_by, bool(tag.ambiguous)))
    assert len(layouts) == 1  # the case the kept answers serve: one header, four files
    assert answers[0] == ("tf_efficientnet_b0", "the file name", False)
    assert answers[1][2], "an anonymous look-alike must stay ambiguous, whatever was named before"
    assert answers[2] == ("efficientnet_b0", "the file name", False)
    assert answers[3] == answers[0]


def test_timm_release_is_read_without_importing_timm():
    assert timm_release(None) == timm.__version__
    assert timm_release(sys.executable) == timm.__version__


# Each command, run as a user runs it, then asked what it imported.
_PROBE = """
import sys
from cachectl.cli import main
code = None
try:
    main(sys.argv[1:], prog_name="cachectl")
except SystemExit as exc:
    code = exc.code
print("\\nIMPORTED", sorted(m for m in ("torch", "timm", "numpy", "safetensors") if m in sys.modules), code)
"""


def test_quick_commands_import_neither_torch_nor_timm(files, tmp_path):
    folder, _ = files
    root = tmp_path / "root"
    fill_store(root, 20)
    commands = [["--help"], ["inspect", str(folder / "w.safetensors"), "--json"], ["inspect", str(folder / "w.pth")],
                ["inspect", str(folder / "train.pth.tar")], ["list"], ["list", "--json"], ["show", "m0"],
                ["path", "m0"], ["pins"], ["status"]]
    # a root never used before: the default environment is listed as it will be, not probed
    fresh = tmp_path / "fresh"
    fresh.mkdir()  # CACHECTL_ROOT names a folder: an empty one becomes the store
    for args, where in [(args, root) for args in commands] + [(args, fresh) for args in (["list"], ["pins"])]:
        proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                              env=dict(os.environ, CACHECTL_ROOT=str(where)))
        *output, last = proc.stdout.rstrip().splitlines()
        assert last.startswith("IMPORTED"), (args, proc.stdout, proc.stderr)
        assert last.split(" ", 1)[1].startswith("[] "), (args, where, last)
        assert last.endswith((" 0", " None")) or args == ["status"], (args, proc.stdout, proc.stderr)
    assert list((fresh / "envs").iterdir()) == []  # registered on first use, by the interpreter itself
    listed = subprocess.run([sys.executable, "-m", "cachectl.cli", "list", "--env", "default", "--json"],
                            capture_output=True, text=True, env=dict(os.environ, CACHECTL_ROOT=str(fresh)))
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
    inspected = json.loads(subprocess.run([sys.executable, "-m", "cachectl.cli", "inspect", str(folder / "w.pth"), "--json"],
                                          capture_output=True, text=True, check=True).stdout)
    assert (inspected["architecture"], inspected["loads_as_is"], inspected["installed_timm"]) == (MODEL, True, timm.__version__)


@pytest.mark.reliability  # the reliability suite's corpus: 25 s, outside the fast tier with it
def test_every_hostile_input_is_read_exactly_or_left_to_the_reader(tmp_path):
    """The reliability suite's corpus (tests/hostile.py): the header reader never raises
    anything but NotPlain, never runs code, and accepts only what is a valid checkpoint."""
    built = subprocess.run([sys.executable, "-m", "tests.hostile", str(tmp_path), "1", "--json"],
                           capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)), check=True)
    cases = [json.loads(line) for line in built.stdout.splitlines()]
    assert len(cases) > 50
    accepted = []
    for case in cases:
        try:
            read_header(case["path"])
        except NotPlain:
            continue
        accepted.append(case["name"])
        assert case["valid"], case["name"]
    assert "good.safetensors" in accepted
