"""The cache through its CLI, on real files, with environments running different timm releases."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import cachectl
from cachectl import tempnames
from cachectl.cli import main
from cachectl.store import sha256_file
from conftest import INSTALLED, make_checkpoint, python_for, run_in

SMALL = "mobilenetv3_small_050"


@pytest.fixture
def root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()  # CACHECTL_ROOT must name a folder: an empty one becomes the store
    monkeypatch.setenv("CACHECTL_ROOT", str(root))
    return root


def cli(*args, input=None, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def rows():
    return {r["version"]: r for r in json.loads(cli("list", "--json").output)}


def copy_to(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def other_bytes(src: Path, dst: Path) -> Path:
    """The same model with other weights: a new version of a name."""
    state = torch.load(src, weights_only=True)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, dst)
    return dst


@pytest.mark.slow
def test_add_list_show_and_path_per_environment(root, tmp_path):
    cli("env", "add", "old", "--python", python_for("0.6.13"))
    made = make_checkpoint("0.6.13", "levit_128s")
    answer = json.loads(cli("add", made.path, "--name", "levit", "--json").output)
    assert answer["version"] == "levit@1" and answer["new_version"] is True
    assert set(answer["environments"]) == {"default", "old"}
    assert all(e["error"] is None for e in answer["environments"].values())

    row = rows()["levit@1"]
    assert row["name"] == "levit" and row["architecture"] == "levit_128s"
    assert "0.6.13" in row["timm_versions"]
    assert row["state"] == "ready" and row["error"] is None
    assert sorted(row["environments"]) == ["default", "old"]
    assert row["pinned"] == [] and row["size"] > made.path.stat().st_size

    # each environment gets a file its own timm loads strictly, with the source's outputs
    for env, release in (("default", INSTALLED), ("old", "0.6.13")):
        path = Path(cli("path", "levit", "--env", env).output.strip())
        converted = json.loads(cli("show", "levit", "--json").output)["environments"][env]["converted"]
        got = run_in(release, {"name": converted["model"], "kwargs": converted["model_kwargs"]}, path, tmp_path)
        assert (got - made.logits).abs().max().item() <= 1e-5
        # a sha256 shown is the file's; a file named by its recipe shows that name instead
        assert converted["sha256"] in (None, sha256_file(path))
        assert converted["sha256"] is not None or converted["recipe_name"] in path.name

    shown = json.loads(cli("show", "levit@1", "--json").output)
    assert shown["source"]["sha256"] == row["sha256"]
    assert shown["origin"] == str(made.path)


def test_same_bytes_twice_is_a_no_op_and_new_bytes_a_new_version(root, tmp_path):
    made = make_checkpoint(INSTALLED, SMALL)
    first = copy_to(made.path, tmp_path / "net.pth")
    cli("add", first)
    again = json.loads(cli("add", first, "--json").output)
    assert again["version"] == "net@1" and again["new_version"] is False
    cli("add", other_bytes(made.path, tmp_path / "net.pth"))
    assert sorted(rows()) == ["net@1", "net@2"]
    blobs = [p for p in (root / "store-v1" / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 4  # two sources, two converted files: nothing stored twice


def test_pins_are_per_environment_and_python_api_follows_them(root, tmp_path):
    cli("env", "add", "prod", "--python", python_for(INSTALLED))
    made = make_checkpoint(INSTALLED, SMALL)
    cli("add", copy_to(made.path, tmp_path / "net.pth"))
    cli("add", other_bytes(made.path, tmp_path / "net.pth"))
    assert "net@1 pinned in prod" in cli("pin", "net@1", "--env", "prod").output
    assert rows()["net@1"]["pinned"] == ["prod"]
    pins = json.loads(cli("pins", "--json").output)
    assert pins["prod"] == {"net": 1} and pins["default"] == {}

    prod = cachectl.load_state_dict("net", env="prod")
    default = cachectl.load_state_dict("net")
    original = torch.load(made.path, weights_only=True)
    key = "conv_stem.weight"
    assert torch.equal(prod[key], original[key])  # prod stays on version 1
    assert torch.equal(default[key], original[key] + 1)  # default follows the newest
    model = cachectl.create_model("net", env="prod")
    assert torch.equal(model.state_dict()[key], original[key])

    cli("unpin", "net", "--env", "prod")
    assert torch.equal(cachectl.load_state_dict("net", env="prod")[key], original[key] + 1)


def test_errors_are_one_sentence_with_a_fix(root, tmp_path):
    result = cli("path", "nothing", ok=False)
    assert result.exit_code == 1 and "nothing named nothing" in result.output and "cachectl add" in result.output
    result = cli("pin", "x@1", "--env", "nope", ok=False)
    assert result.exit_code == 1 and "no environment named nope" in result.output
    result = cli("prune", ok=False)
    assert result.exit_code == 1 and "--keep-last" in result.output
    (tmp_path / "junk.pth").write_text("not weights")
    result = cli("add", tmp_path / "junk.pth", ok=False)
    assert result.exit_code == 1 and "junk.pth" in result.output and "not a checkpoint" in result.output


def _three_versions(tmp_path):
    made = make_checkpoint(INSTALLED, SMALL)
    path = tmp_path / "net.pth"
    for i in range(3):
        state = {k: v + i if v.is_floating_point() else v for k, v in torch.load(made.path, weights_only=True).items()}
        torch.save(state, path)
        cli("add", path)
    return made


def test_prune_keep_last_plans_asks_and_keeps_pins(root, tmp_path):
    _three_versions(tmp_path)
    cli("pin", "net@1", "--env", "default")
    plan = json.loads(cli("prune", "--keep-last", "1", "--dry-run", "--json").output)
    assert plan["remove"] == ["net@2"]
    assert {"version": "net@1", "why": "pinned"} in plan["kept"]
    assert plan["freed"] > 0
    assert sorted(rows()) == ["net@1", "net@2", "net@3"]  # a dry run removes nothing

    refused = cli("prune", "--keep-last", "1", input="n\n", ok=False)
    assert refused.exit_code == 1 and sorted(rows()) == ["net@1", "net@2", "net@3"]
    before = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    done = cli("prune", "--keep-last", "1", input="y\n")
    assert "freed" in done.output
    assert sorted(rows()) == ["net@1", "net@3"]
    after = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert before - after >= plan["freed"] * 0.99
    assert cli("verify").output.strip() == "all good"


def test_prune_older_than_and_max_size_never_take_the_newest(root, tmp_path):
    _three_versions(tmp_path)
    plan = json.loads(cli("prune", "--older-than", "0s", "--dry-run", "--json").output)
    assert plan["remove"] == ["net@1", "net@2"]
    assert {"version": "net@3", "why": "newest version of net"} in plan["kept"]
    sizes = {r["version"]: r["size"] for r in rows().values()}
    budget = sizes["net@3"] + sizes["net@2"] + 1
    plan = json.loads(cli("prune", "--max-size", str(budget), "--dry-run", "--json").output)
    assert plan["remove"] == ["net@1"]  # the oldest goes first, and only as many as needed
    # what it can free, it frees; that the newest alone is over the size, it says, non-zero
    short = cli("prune", "--max-size", "1", "--yes", ok=False)
    assert short.exit_code == 1 and "over --max-size 1" in short.output and "freed" in short.output
    assert sorted(rows()) == ["net@3"]


def test_prune_keeps_what_is_being_written(root, tmp_path):
    from cachectl.store import Store

    _three_versions(tmp_path)
    store = Store(root)
    with store.lock("name:net"):
        plan = json.loads(cli("prune", "--keep-last", "1", "--dry-run", "--json").output)
    assert plan["remove"] == []
    assert {"version": "net@1", "why": "being written"} in plan["kept"]


def test_verify_finds_a_damaged_blob(root, tmp_path):
    made = make_checkpoint(INSTALLED, SMALL)
    cli("add", copy_to(made.path, tmp_path / "net.pth"))
    assert cli("verify", "net").exit_code == 0
    blob = Path(cli("path", "net").output.strip())
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    result = cli("verify", ok=False)
    assert result.exit_code == 1 and "damaged" in result.output and str(blob) in result.output


_ADD = """
import sys
from cachectl.cache import Cache
with Cache(sys.argv[1]) as cache:
    r = cache.add(sys.argv[2], "net")
    print(r.version.ref, [l.converted for l in r.links])
"""


def test_concurrent_writers_convert_once(root, tmp_path):
    made = make_checkpoint(INSTALLED, SMALL)
    src = copy_to(made.path, tmp_path / "net.pth")
    procs = [subprocess.Popen([sys.executable, "-c", _ADD, str(root), str(src)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(rows()) == ["net@1"]
    converted = list((root / "store-v1" / "converted").glob("*.json"))
    assert len(converted) == 1
    assert len({o.strip() for o in outs}) == 1  # every writer points at the same converted entry


_SLOW_ADD = """
import sys, time
from cachectl import safetensors_io
from cachectl.cache import Cache
real = safetensors_io.write
def slow(*args, **kwargs):
    print("writing", flush=True)
    time.sleep(60)
    return real(*args, **kwargs)
import cachectl.convert
cachectl.convert.write = slow
with Cache(sys.argv[1]) as cache:
    cache.add(sys.argv[2], "net")
"""


def test_writer_killed_mid_write_leaves_a_store_that_reads_and_heals(root, tmp_path):
    made = make_checkpoint(INSTALLED, SMALL)
    src = copy_to(made.path, tmp_path / "net.pth")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_ADD, str(root), str(src)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    (root / "store-v1" / "blobs" / (".new.pid%d.1.safetensors.tmp" % proc.pid)).write_bytes(b"half")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the version was recorded, its conversion was not: the store reads and says so, and
    # with the writer dead nothing is converting it any more
    assert rows()["net@1"]["state"] == "pending"
    plan = json.loads(cli("prune", "--keep-last", "5", "--dry-run", "--json").output)
    assert any(p.endswith(".tmp") for p in plan["leftovers"])
    cli("prune", "--keep-last", "5", "--yes")
    assert not list(root.rglob("*.tmp"))
    # the next reader converts what is missing, once
    assert Path(cli("path", "net").output.strip()).exists()
    assert rows()["net@1"]["state"] == "ready"


def test_prune_removes_a_leftover_only_once_its_writer_is_gone_on_this_host_or_another(root):
    cli("init")
    store = root / "store-v1"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = tempnames.this_host()
    stale = time.time() - tempnames.LEASE_SECONDS - 60
    try:
        # (folder, name, seconds since its last write, kept): a store shared over NFS, where
        # another host's pid says nothing here and only its file's mtime tells a live write
        cases = [
            (store / "blobs" / "sha256", ".new.safetensors@node7.cluster.pid%d.00aa11bb22cc.tmp" % dead.pid, None, True),
            (store / "blobs" / "sha256", ".ingest@node7.cluster.pid%d.33dd44ee55ff.tmp" % live.pid, stale, False),
            (store / "names", ".net.json@%s.pid%d.0123456789ab.tmp" % (here, live.pid), stale, True),
            (store / "names", ".net.json@%s.pid%d.ba9876543210.tmp" % (here, dead.pid), None, False),
            # names written before hosts were named: this host's, judged by their pid
            (store / "blobs" / "sha256" / "ab", ".new.pid%d.1.safetensors.tmp" % live.pid, None, True),
            (store / "sources", ".%s.json.pid%d.0123456789ab.tmp" % ("a" * 64, dead.pid), None, False),
            (root, ".publications.json.pid%d.tmp" % dead.pid, None, False),
        ]
        for folder, name, mtime, _ in cases:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"half")
            if mtime:
                os.utime(folder / name, (mtime, mtime))
        made = tempnames.parse(tempnames.temp_name("net.json"))
        assert made == tempnames.TempName("net.json", here, os.getpid()) and made.local

        planned = set(json.loads(cli("prune", "--keep-last", "5", "--dry-run", "--json").output)["leftovers"])
        assert planned == {str(folder / name) for folder, name, _, kept in cases if not kept}
        cli("prune", "--keep-last", "5", "--yes")
        for folder, name, _, kept in cases:
            assert (folder / name).exists() == kept, name
        assert live.poll() is None
    finally:
        live.kill()
        live.wait()


def test_rm_prune_short_of_size_json_answers_and_one_line_errors(root, tmp_path):
    made = make_checkpoint(INSTALLED, SMALL)
    cli("add", copy_to(made.path, tmp_path / "net.pth"), "--name", "net")
    cli("add", other_bytes(made.path, tmp_path / "net2.pth"), "--name", "net")
    # scripts get JSON from every command that answers
    answer = json.loads(cli("path", "net", "--json").output)
    assert Path(answer["path"]).exists() and answer["version"] == "net@2" and answer["model"]["name"] == SMALL
    assert json.loads(cli("pin", "net@1", "--env", "default", "--json").output)["version"] == "net@1"
    assert json.loads(cli("verify", "--json").output) == {"ok": True, "problems": []}

    # a pinned version cannot be removed; one line, non-zero
    refused = cli("rm", "net@1", "--yes", ok=False)
    assert refused.exit_code == 1 and "pinned in default" in refused.output and "Traceback" not in refused.output
    cli("unpin", "net", "--env", "default")
    plan = json.loads(cli("rm", "net@1", "--dry-run", "--json").output)
    assert plan["remove"] == ["net@1"] and plan["freed"] > 0
    assert "net@1" in rows()
    cli("rm", "net@1", "--yes")
    assert list(rows()) == ["net@2"]

    # prune that cannot reach --max-size says so and exits non-zero
    short = cli("prune", "--max-size", "1K", "--yes", ok=False)
    assert short.exit_code == 1 and "over --max-size" in short.output
    # no undocumented variables: CACHECTL_PRUNE_YES does not skip the question
    state = torch.load(made.path, weights_only=True)
    torch.save({k: v * 3 if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "net3.pth")
    cli("add", tmp_path / "net3.pth", "--name", "net")
    os.environ["CACHECTL_PRUNE_YES"] = "1"
    try:
        asked = cli("prune", "--keep-last", "1", input="n\n", ok=False)
    finally:
        del os.environ["CACHECTL_PRUNE_YES"]
    assert asked.exit_code == 1 and "Delete these?" in asked.output and "nothing deleted" in asked.output
    assert sorted(rows()) == ["net@2", "net@3"]
    # a user error is one line naming what to do, for every command
    missing = cli("show", "nothing", ok=False)
    assert missing.exit_code == 1 and missing.output.count("\n") == 1 and "cachectl list" in missing.output


@pytest.mark.slow
def test_the_python_api_inside_a_registered_environment_uses_that_environment(root, tmp_path):
    old = python_for("0.6.13")
    cli("env", "add", "old", "--python", old)
    made = make_checkpoint("0.6.13", "levit_128s")
    cli("add", made.path, "--name", "levit")
    code = ("import cachectl, timm; m = cachectl.create_model('levit'); "
            "print(timm.__version__, sum(p.numel() for p in m.parameters()))")
    proc = subprocess.run([str(old), "-W", "ignore", "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, CACHECTL_ROOT=str(root)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == "0.6.13"
    # an interpreter whose timm no environment runs is told how to register it
    with pytest.raises(cachectl.errors.CachectlError, match="env add"):
        from cachectl.cache import Cache

        with Cache(root) as cache:
            cache.store.put_env(dataclasses.replace(cache.env("default"), timm="9.9.9"))
            cache.env_here()


def test_a_safetensors_file_that_loads_as_it_is_is_its_own_conversion(root, tmp_path):
    made = make_checkpoint(INSTALLED, SMALL, fmt="safetensors")
    answer = json.loads(cli("add", copy_to(made.path, tmp_path / "net.safetensors"), "--json").output)
    converted = Path(cli("path", "net").output.strip())
    blob = root / "store-v1" / "blobs" / "sha256" / answer["sha256"][:2] / answer["sha256"]
    # no byte copied: the same file under the name timm's loader wants
    assert converted.stat().st_ino == blob.stat().st_ino
    assert rows()["net@1"]["size"] == blob.stat().st_size
    assert json.loads(cli("verify", "--json").output)["ok"]
    shown = json.loads(cli("show", "net", "--json").output)
    assert "the stored source itself, linked" in shown["environments"]["default"]["converted"]["steps"]
    assert same_outputs(run_in(INSTALLED, {"name": SMALL, "kwargs": {}}, converted, tmp_path), made.logits)


def same_outputs(a, b) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= 1e-5


LONG = "a_fine_tuned_mobilenet_whose_name_is_longer_than_an_eighty_column_terminal_is_wide"


def test_listing_answers_people_and_scripts(root, tmp_path):
    made = make_checkpoint(INSTALLED, SMALL)
    first = copy_to(made.path, tmp_path / "net.pth")
    cli("add", first, "--name", LONG)
    cli("add", other_bytes(made.path, tmp_path / "net2.pth"), "--name", LONG)
    cli("add", copy_to(made.path, tmp_path / "small.pth"), "--name", "small")
    cli("env", "add", "prod", "--python", sys.executable)
    cli("pin", "%s@1" % LONG, "--env", "prod")

    # names are typed into other commands: whole at 80 columns
    table = CliRunner().invoke(main, ["list"], env={"COLUMNS": "80"})
    assert table.exit_code == 0 and "%s@1" % LONG in table.output and "%s@2" % LONG in table.output
    assert "None" not in table.output
    # names only, a pattern, an order
    assert cli("list", "-q").output.split() == ["%s@1" % LONG, "%s@2" % LONG, "small@1"]
    assert cli("list", "-q", "a_fine*@2").output.split() == ["%s@2" % LONG]
    assert cli("list", "-q", "--sort", "age").output.split()[0] == "small@1"
    assert cli("list", "nothing*").output.strip() == "nothing matches nothing*"
    # sizes: the stored file and its converted copies apart
    row = rows()["small@1"]
    assert row["source_size"] == first.stat().st_size and row["converted_size"] > 0
    assert row["size"] == row["source_size"] + row["converted_size"]
    # an environment's listing shows its own pins only
    listed = {r["version"]: r for r in json.loads(cli("list", "--env", "default", "--json").output)}
    assert listed["%s@1" % LONG]["pinned"] == []
    listed = {r["version"]: r for r in json.loads(cli("list", "--env", "prod", "--json").output)}
    assert listed["%s@1" % LONG]["pinned"] == ["prod"]
    # show names the source's format and never prints None
    shown = cli("show", "small").output
    assert "None" not in shown and "torch" in shown.splitlines()[1]
    assert json.loads(cli("show", "small", "--json").output)["source"]["format"] not in (None, "None")
    # every command that answers answers in JSON too
    assert json.loads(cli("unpin", LONG, "--env", "prod", "--json").output)["was_pinned"] is True
    assert json.loads(cli("views", "verify", "--json").output)["ok"] is True
    assert json.loads(cli("env", "rm", "prod", "--json").output)["removed"] == "prod"


def test_the_store_owns_its_layout_and_reports_what_it_cannot_read(root, tmp_path):
    made = make_checkpoint(INSTALLED, SMALL)
    cli("add", copy_to(made.path, tmp_path / "net.pth"))
    cli("add", other_bytes(made.path, tmp_path / "net.pth"))
    cli("pin", "net@1", "--env", "default")
    tag = (root / "CACHEDIR.TAG").read_text()
    assert tag.startswith("Signature: 8a477f597d28d172789f06886806bc55")
    written = [p for d in ("store-v1", "envs", "pins") for p in (root / d).rglob("*.json")]
    assert len(written) >= 8
    for path in written:
        raw = json.loads(path.read_text())
        # a converted file named by its recipe is format 2: an older cachectl would call it damaged
        assert raw["format"] == (2 if raw.get("recipe") else 1), path
    assert any(json.loads(p.read_text()).get("recipe") for p in written)

    # one damaged manifest, one from a newer cachectl: reported, the rest still listed
    net1, net2 = rows()["net@1"]["sha256"], rows()["net@2"]["sha256"]
    (root / "store-v1" / "sources" / ("%s.json" % net1)).write_text('{"sha256": "trunc')
    converted = next((root / "store-v1" / "converted").glob("%s*.json" % net2[:16]))
    converted.write_text(json.dumps({"format": 3, "id": "x"}))
    listed = CliRunner().invoke(main, ["list", "--json"])
    assert listed.exit_code == 0
    assert sorted(r["version"] for r in json.loads(listed.stdout)) == ["net@1", "net@2"]
    assert "is damaged" in listed.stderr and "written by a newer cachectl (format 3" in listed.stderr
    shown = CliRunner().invoke(main, ["show", "net@1"])
    assert shown.exit_code == 0 and "Traceback" not in shown.output and "cachectl verify net@1" in shown.stdout
    verified = cli("verify", ok=False)
    assert verified.exit_code == 1 and "%s.json: is damaged" % net1 in verified.output

    # a store from before tags and versioned pins is recognised and read, not refused
    (root / "CACHEDIR.TAG").unlink()
    (root / "pins" / "default.json").write_text(json.dumps({"net": 1}))
    listed = {r["version"]: r for r in json.loads(cli("--root", root, "list", "--json").stdout)}
    assert listed["net@1"]["pinned"] == ["default"] and (root / "CACHEDIR.TAG").is_file()
    with pytest.raises(cachectl.errors.CachectlError, match="does not exist"):
        cachectl.load_state_dict("net", root=str(tmp_path / "typo"))


def test_a_root_that_is_not_a_store_is_refused(root, tmp_path):
    typo = tmp_path / "cachectl-sotre"
    refused = cli("--root", typo, "list", ok=False)
    assert refused.exit_code == 1 and "does not exist" in refused.output and "init" in refused.output
    assert not typo.exists()
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"jpg")
    refused = cli("--root", other, "list", ok=False)
    assert refused.exit_code == 1 and "is not a cachectl store" in refused.output
    assert sorted(p.name for p in other.iterdir()) == ["cat.jpg"]
    # made on purpose, it is a store; status names the folder it looked at
    assert "store at %s" % typo in cli("--root", typo, "init").output
    assert cli("--root", typo, "list", "--json").output.strip() == "[]"
    assert str(typo) in cli("--root", typo, "status", ok=False).output


def test_prune_keeps_a_version_added_with_the_same_bytes_while_it_asked(root, tmp_path):
    from cachectl.cache import Cache
    from cachectl.prune import Policy, plan

    made = make_checkpoint(INSTALLED, SMALL)
    first = copy_to(made.path, tmp_path / "net.pth")
    cli("add", first)
    cli("add", other_bytes(made.path, tmp_path / "net2.pth"), "--name", "net")
    with Cache(root) as cache:
        p = plan(cache.store, Policy(keep_last=1))
        assert [v.ref for v in p.versions] == ["net@1"]
        # while the prompt is open, the same bytes come in under another name
        cli("add", first, "--name", "again")
        p.execute(cache.store)
    assert sorted(rows()) == ["again@1", "net@2"]
    path = Path(cli("path", "again").output.strip())
    assert path.is_file()
    assert json.loads(cli("verify", "--json").output) == {"ok": True, "problems": []}


@pytest.mark.slow
def test_env_rm_frees_what_only_it_loaded(root, tmp_path):
    cli("env", "add", "old", "--python", python_for("0.6.13"))
    made = make_checkpoint("0.6.13", "levit_128s")
    cli("add", made.path, "--name", "levit")
    only_old = Path(json.loads(cli("path", "levit", "--env", "old", "--json").output)["path"])
    default = Path(cli("path", "levit").output.strip())
    assert only_old != default and only_old.is_file()
    size = only_old.stat().st_size
    answer = json.loads(cli("env", "rm", "old", "--json").output)
    assert answer == {"removed": "old", "freed": size}
    assert not only_old.exists() and default.is_file()
    assert json.loads(cli("verify", "--json").output) == {"ok": True, "problems": []}
    assert rows()["levit@1"]["environments"] == ["default"]


def _at_a_terminal(root, code: str) -> str:
    """What a cachectl process run by `code` writes to its stderr when that is a terminal."""
    import pty

    primary, secondary = pty.openpty()
    proc = subprocess.run([sys.executable, "-c", code, "list"], stdout=subprocess.DEVNULL, stderr=secondary,
                          env=dict(os.environ, CACHECTL_ROOT=str(root)), timeout=120)
    os.close(secondary)
    assert proc.returncode == 0
    seen = b""
    try:
        while chunk := os.read(primary, 65536):
            seen += chunk
    except OSError:  # the terminal's other side is closed: all is read
        pass
    os.close(primary)
    return seen.decode(errors="replace")


def test_a_quick_command_at_a_terminal_draws_no_spinner_and_a_slow_step_does(root):
    from benchmarks.store_scan import build

    build(root, 20)
    run = "import sys; sys.argv[0] = 'cachectl'; import cachectl.cli as c; %s; c.main()"
    assert "reading the store" not in _at_a_terminal(root, run % "pass")
    # a step that outlasts SPINNER_AFTER is shown while it runs (this one: a second longer)
    slow = ("c.SPINNER_AFTER = 0.1; import time, cachectl.cache as k; scan = k.Cache.scan; "
            "k.Cache.scan = lambda self: time.sleep(1) or scan(self)")
    assert "reading the store" in _at_a_terminal(root, run % slow)
