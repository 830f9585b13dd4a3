"""Views: unmodified `timm.create_model(name, pretrained=True)` loads the cache's files offline.

Each load runs in a subprocess of a real timm release with no network (its own network
namespace where the machine allows one) and no variables but PATH, HOME and what
`cachectl env activate` prints; its outputs must equal those of the release that made
the checkpoint.
"""
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachectl.cli import main
from conftest import ATOL, make_checkpoint, python_for, run_in
from tools.timm_releases import RELEASES_DIR, release_dir

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

SCRIPT = Path(__file__).resolve().parent / "pretrained_script.py"
# timm 0.9 reads the hub only through a huggingface_hub it can import; the venv's is too new
OLD_HUB = "0.20.3"


def _no_network_prefix() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []  # HF_HUB_OFFLINE alone keeps them off the network; there is none here anyway


NO_NETWORK = _no_network_prefix()


def python_with_old_hub(version: str) -> Path:
    """timm==version with huggingface_hub==OLD_HUB beside it: an environment of its time."""
    hub = RELEASES_DIR / ("huggingface_hub-%s" % OLD_HUB)
    if not (hub / "huggingface_hub" / "__init__.py").exists():
        tmp = RELEASES_DIR / (".hub.%d.partial" % os.getpid())
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
                        "huggingface_hub==%s" % OLD_HUB, "requests", "urllib3", "idna", "certifi",
                        "charset_normalizer"], check=True)
        os.rename(tmp, hub)
    wrapper = RELEASES_DIR / "envs" / ("%s-hub-%s" % (version, OLD_HUB)) / "python"
    if not wrapper.exists():
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        tmp = wrapper.with_name(".python.%d" % os.getpid())
        tmp.write_text('#!/bin/sh\nPYTHONPATH="%s:%s${PYTHONPATH:+:$PYTHONPATH}" exec "%s" "$@"\n'
                       % (release_dir(version), hub, sys.executable))
        tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        tmp.replace(wrapper)
    return wrapper


def cli(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()  # CACHECTL_ROOT must name a folder: an empty one becomes the store
    monkeypatch.setenv("CACHECTL_ROOT", str(root))
    return root


def activated(env: str) -> dict[str, str]:
    """The variables `cachectl env activate ENV` prints, parsed as a shell would."""
    out = {}
    for line in cli("env", "activate", env).output.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        out[key] = shlex.split(value)[0]
    return out


def pretrained(python: Path, env: str, name: str, tmp_path: Path, kwargs: dict | None = None, ok: bool = True):
    """Outputs of `timm.create_model(name, pretrained=True)` run by `python` with only ENV's view."""
    out = tmp_path / ("pretrained-%s-%s.logits" % (env, name.replace("/", "_").replace(":", "_")))
    environ = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **activated(env)}
    args = [*NO_NETWORK, str(python), "-W", "ignore", str(SCRIPT), name, str(out)]
    if kwargs:
        args.append(json.dumps(kwargs))
    proc = subprocess.run(args, capture_output=True, text=True, env=environ, cwd=tmp_path)
    if not ok:
        assert proc.returncode != 0, "pretrained=True of %s in %s loaded something" % (name, env)
        return proc.stderr
    assert proc.returncode == 0, "%s in %s failed:\n%s" % (name, env, proc.stderr[-3000:])
    return torch.load(out, weights_only=True)["logits"]


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and (got - want).abs().max().item() <= ATOL


def served(env: str) -> dict[str, dict]:
    return {s["pretrained"]: s for s in json.loads(cli("views", "list", "--env", env, "--json").output)[env]["served"]}


def test_old_swin_and_levit_under_their_url_names_load_with_pretrained_true_in_every_release(root, tmp_path):
    envs = {"t04": python_for("0.4.12"), "t06": python_for("0.6.13"), "t09": python_with_old_hub("0.9.16"),
            "t09nohub": python_for("0.9.16")}  # timm 0.9.16 beside a huggingface_hub it cannot import
    for name, python in envs.items():
        cli("env", "add", name, "--python", python)
    swin = make_checkpoint("0.6.13", "swin_tiny_patch4_window7_224")
    levit = make_checkpoint("0.6.13", "levit_128s")
    cli("add", shutil.copy(swin.path, tmp_path / "swin_tiny_patch4_window7_224.pth"))
    cli("add", shutil.copy(levit.path, tmp_path / "LeViT-128S-96703c44.pth"))

    # before 0.9: torch.hub's checkpoints folder, under the URL's file name, torch format
    for env in ("t04", "t06"):
        assert served(env)["swin_tiny_patch4_window7_224"]["checkpoint"] == "swin_tiny_patch4_window7_224.pth"
        assert same(pretrained(envs[env], env, "swin_tiny_patch4_window7_224", tmp_path), swin.logits)
        assert same(pretrained(envs[env], env, "levit_128s", tmp_path), levit.logits)
    # 0.9 and later: the hub cache, by tag; LeViT's weights became its default tag
    assert served("t09")["levit_128s.fb_dist_in1k"]["hub_repo"] == "timm/levit_128s.fb_dist_in1k"
    assert same(pretrained(envs["t09"], "t09", "swin_tiny_patch4_window7_224.ms_in1k", tmp_path), swin.logits)
    assert same(pretrained(envs["t09"], "t09", "levit_128s", tmp_path), levit.logits)
    # without a huggingface_hub, timm 0.9 reads torch.hub's folder (TIMM_USE_OLD_CACHE)
    assert served("t09nohub")["swin_tiny_patch4_window7_224.ms_in1k"]["checkpoint"] == "swin_tiny_patch4_window7_224.pth"
    assert same(pretrained(envs["t09nohub"], "t09nohub", "swin_tiny_patch4_window7_224", tmp_path), swin.logits)
    skipped = json.loads(cli("views", "list", "--env", "t09nohub", "--json").output)["t09nohub"]["skipped"]
    assert any(s["pretrained"] == "levit_128s.fb_dist_in1k" and "huggingface_hub" in s["reason"] for s in skipped)
    assert same(pretrained(Path(sys.executable), "default", "swin_tiny_patch4_window7_224", tmp_path), swin.logits)
    assert same(pretrained(Path(sys.executable), "default", "levit_128s.fb_dist_in1k", tmp_path), levit.logits)
    assert same(pretrained(Path(sys.executable), "default", "hf-hub:timm/swin_tiny_patch4_window7_224.ms_in1k",
                           tmp_path), swin.logits)

    # every file in a view is a link into the store, never a copy
    views = root / "views"
    weights = [p for p in views.rglob("*") if p.name.endswith((".pth", ".safetensors"))]
    assert weights and all(p.is_symlink() and p.resolve().is_relative_to(root / "store-v1" / "blobs") for p in weights)
    assert "all views good" in cli("views", "verify").output
    row = {r["version"]: r for r in json.loads(cli("list", "--json").output)}["LeViT-128S-96703c44@1"]
    assert "levit_128s in t06" in row["served"] and "levit_128s.fb_dist_in1k in default" in row["served"]


def test_a_hub_cache_entry_of_a_new_timm_serves_an_old_environment(root, tmp_path):
    python06 = python_for("0.6.13")
    cli("env", "add", "t06", "--python", python06)
    made = make_checkpoint("installed", "swin_tiny_patch4_window7_224", fmt="safetensors")
    snapshot = tmp_path / "hub" / "models--timm--swin_tiny_patch4_window7_224.ms_in1k" / "snapshots" / "ab12"
    snapshot.mkdir(parents=True)
    shutil.copy(made.path, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({"architecture": "swin_tiny_patch4_window7_224", "num_classes": 1000}))
    cli("add", snapshot)
    assert served("t06")["swin_tiny_patch4_window7_224"]["how"].startswith(("hub:", "name:", "url:"))
    assert same(pretrained(python06, "t06", "swin_tiny_patch4_window7_224", tmp_path), made.logits)


def test_a_renamed_model_is_served_under_the_name_of_each_release(root, tmp_path):
    made = make_checkpoint("0.6.13", "tf_efficientnet_b0_ap")
    cli("add", shutil.copy(made.path, tmp_path / "tf_efficientnet_b0_ap-f262efe1.pth"))
    assert "tf_efficientnet_b0.ap_in1k" in served("default")
    assert same(pretrained(Path(sys.executable), "default", "tf_efficientnet_b0.ap_in1k", tmp_path), made.logits)


def test_publish_serves_a_users_checkpoint_and_a_fine_tuned_head_through_its_own_tag(root, tmp_path):
    python09 = python_with_old_hub("0.9.16")
    cli("env", "add", "t09", "--python", python09)
    mine = make_checkpoint("0.6.13", "resnet18")
    cli("add", shutil.copy(mine.path, tmp_path / "model_best.pth"), "--name", "mine", "--model", "resnet18")
    assert served("default") == {}  # nothing in the file says which pretrained model it is

    cli("publish", "mine", "--as", "resnet18.a1_in1k")
    assert same(pretrained(Path(sys.executable), "default", "resnet18.a1_in1k", tmp_path), mine.logits)
    assert same(pretrained(python09, "t09", "resnet18.a1_in1k", tmp_path), mine.logits)
    cli("unpublish", "resnet18.a1_in1k")
    assert served("default") == {}
    assert "resnet18.a1_in1k" not in served("t09")
    pretrained(Path(sys.executable), "default", "resnet18.a1_in1k", tmp_path, ok=False)

    # a head of its own: not under a registry tag whose classes differ (timm would drop it)...
    tuned = make_checkpoint("installed", "resnet18", {"num_classes": 10})
    cli("add", shutil.copy(tuned.path, tmp_path / "cars.pth"), "--name", "cars", "--model", "resnet18")
    answer = json.loads(cli("publish", "cars", "--as", "resnet18.a1_in1k", "--json").output)
    reasons = [s["reason"] for s in answer["default"]["skipped"] if s["pretrained"] == "resnet18.a1_in1k"]
    assert reasons and "10 classes" in reasons[0]
    cli("unpublish", "resnet18.a1_in1k")
    # ...but under its own, where config.json carries its classes
    cli("publish", "cars", "--as", "resnet18.cachectl_cars")
    for python, env in ((Path(sys.executable), "default"), (python09, "t09")):
        assert same(pretrained(python, env, "hf-hub:timm/resnet18.cachectl_cars", tmp_path), tuned.logits)


def test_a_pin_switches_what_pretrained_true_loads_and_prune_keeps_what_views_serve(root, tmp_path):
    first = make_checkpoint("0.6.13", "levit_128s")
    state = torch.load(first.path, weights_only=True)
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "second.pth")
    second_logits = run_in("0.6.13", {"name": "levit_128s", "kwargs": {}}, tmp_path / "second.pth", tmp_path)
    assert not same(first.logits, second_logits)
    file = tmp_path / "LeViT-128S-96703c44.pth"
    cli("add", shutil.copy(first.path, file))
    cli("add", shutil.copy(tmp_path / "second.pth", file))
    python = Path(sys.executable)
    assert same(pretrained(python, "default", "levit_128s", tmp_path), second_logits)
    cli("pin", "LeViT-128S-96703c44@1", "--env", "default")
    assert same(pretrained(python, "default", "levit_128s", tmp_path), first.logits)
    cli("unpin", "LeViT-128S-96703c44", "--env", "default")
    # version 1 left the view just now: its snapshot stays for readers on their way to it
    plan = json.loads(cli("prune", "--keep-last", "1", "--dry-run", "--json").output)
    assert {"version": "LeViT-128S-96703c44@1", "why": "served by a view"} in plan["kept"]
    assert same(pretrained(python, "default", "levit_128s", tmp_path), second_logits)


READER = r"""
import os, sys, time, torch, timm
from release_script import fixed_input
stop, out = sys.argv[1], sys.argv[2]
results = []
while not os.path.exists(stop):
    try:
        model = timm.create_model("levit_128s.fb_dist_in1k", pretrained=True).eval()
        with torch.no_grad():
            results.append(model(fixed_input(model)))
    except Exception as exc:  # what the user's code would see
        results.append("%s: %s" % (type(exc).__name__, exc))
    with open(out + ".count", "w") as f:
        f.write(str(len(results)))
torch.save(results, out)
"""


def loads_so_far(results: Path) -> int:
    try:
        return int(Path(str(results) + ".count").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_the_daemon_keeps_views_current_while_a_reader_loads_in_a_loop(root, tmp_path):
    from test_daemon_process import Daemon, wait_for

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    log = tmp_path / "daemon.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cachectld", "--watch", inbox, "--quiet-seconds", "1"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    daemon = Daemon(proc, root, log)
    try:
        made = make_checkpoint("0.6.13", "levit_128s")
        versions = [made.path]
        for i in (2, 3):
            state = torch.load(made.path, weights_only=True)
            versions.append(tmp_path / ("v%d.pth" % i))
            torch.save({k: v * (1 + i / 100) if v.is_floating_point() else v for k, v in state.items()}, versions[-1])
        refs = [made.logits] + [run_in("0.6.13", {"name": "levit_128s", "kwargs": {}}, v, tmp_path) for v in versions[1:]]
        dropped = inbox / "LeViT-128S-96703c44.pth"

        # dropped in, served by the view without anyone running a command
        shutil.copyfile(versions[0], dropped)
        assert daemon.result(dropped)["ok"]
        wait_for(lambda: "levit_128s.fb_dist_in1k" in served("default"), "the view to serve levit", daemon)
        assert same(pretrained(Path(sys.executable), "default", "levit_128s.fb_dist_in1k", tmp_path), refs[0])

        # a reader loading in a loop while new versions arrive and prune runs
        stop, results = tmp_path / "stop", tmp_path / "reader.pt"
        reader = subprocess.Popen([sys.executable, "-W", "ignore", "-c", READER, str(stop), str(results)],
                                  env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **activated("default"),
                                       "PYTHONPATH": str(SCRIPT.parent)}, cwd=tmp_path)
        wait_for(lambda: loads_so_far(results) >= 1, "the reader's first load", daemon)
        for i, version in enumerate(versions[1:], start=2):
            shutil.copyfile(version, dropped)
            assert daemon.result(dropped, count=i)["ok"]
            wait_for(lambda: served("default")["levit_128s.fb_dist_in1k"]["version"].endswith("@%d" % i),
                     "the view to serve version %d" % i, daemon)
            cli("prune", "--keep-last", "1", "--yes")
        done = loads_so_far(results)
        wait_for(lambda: loads_so_far(results) >= done + 2, "the reader's loads of the last version", daemon)
        stop.touch()
        assert reader.wait(timeout=600) == 0
        loads = torch.load(results, weights_only=True)
        assert len(loads) > 3
        failures = [r for r in loads if isinstance(r, str)]
        assert not failures, failures[:3]
        assert all(any(same(r, ref) for ref in refs) for r in loads)
        assert same(loads[-1], refs[-1])

        # a pin moves what pretrained=True loads; prune kept version 1, which a view linked moments ago
        cli("pin", "LeViT-128S-96703c44@1", "--env", "default")
        assert same(pretrained(Path(sys.executable), "default", "levit_128s.fb_dist_in1k", tmp_path), refs[0])
    finally:
        daemon.stop()
