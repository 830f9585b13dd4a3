"""A store a group shares: real Unix users, real permissions, real locks, real mounts."""
import grp
import json
import os
import errno
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import cachectl
from cachectl import locks, tempnames, views
from cachectl.cli import main
from cachectl.errors import CachectlError
from cachectl.store import Store
from conftest import INSTALLED, make_checkpoint

SMALL = "mobilenetv3_small_050"
PY = sys.executable
REPO = Path(__file__).resolve().parent.parent


def _ok(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _closed_folders(*paths: Path) -> list[Path]:
    """Folders above `paths`, as written and as resolved, that other users cannot pass through
    (a venv's python is a link: its own folder, e.g. a CI's mktemp -d, must be passed too)."""
    above: list[Path] = []
    for path in paths:
        for p in (*Path(os.path.abspath(path)).parents, *Path(os.path.realpath(path)).parents):
            if p not in above and not os.stat(p).st_mode & 0o001:
                above.append(p)
    return above


def _let_group_through(folder: Path, gid: int) -> None:
    """A POSIX ACL on `folder` that lets group `gid` (only) pass through it, as setfacl -m g:GID:x."""
    try:
        os.getxattr(folder, "system.posix_acl_access")
        pytest.skip("%s already has an ACL; this test does not touch it" % folder)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            pytest.skip("%s cannot take an ACL here (%s)" % (folder, exc.strerror))
    mode = os.stat(folder).st_mode & 0o777
    undefined = 0xFFFFFFFF
    entries = [(0x01, mode >> 6, undefined), (0x04, (mode >> 3) & 7, undefined), (0x08, 1, gid),
               (0x10, ((mode >> 3) & 7) | 1, undefined), (0x20, mode & 7, undefined)]
    os.setxattr(folder, "system.posix_acl_access",
                struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries))


@pytest.fixture
def two_users():
    """(base folder, group, writer, reader): two fresh users whose primary group is a fresh group."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create two Unix users and a group (useradd, groupadd)")
    if not (shutil.which("useradd") and shutil.which("runuser")):
        pytest.skip("needs useradd and runuser to create users and run commands as them")
    tag = uuid.uuid4().hex[:6]
    group, writer, reader = "cct%s" % tag, "cctw%s" % tag, "cctr%s" % tag
    base = Path(tempfile.mkdtemp(prefix="cachectl-shared-", dir="/tmp"))
    os.chmod(base, 0o755)
    made = []
    opened: list[tuple[Path, int]] = []
    try:
        _ok("groupadd", group)
        made.append(("groupdel", group))
        # the interpreter may sit under a private home (/root/.pyenv): the test's group,
        # and no one else, may pass through to it until the test ends
        for folder in _closed_folders(Path(PY), REPO, Path(cachectl.__file__)):
            opened.append((folder, os.stat(folder).st_mode & 0o7777))
            _let_group_through(folder, grp.getgrnam(group).gr_gid)
        for user in (writer, reader):
            _ok("useradd", "-M", "-N", "-g", group, "-s", "/bin/sh", user)
            made.insert(0, ("userdel", user))
            home = base / ("home-" + user)
            home.mkdir()
            shutil.chown(home, user, group)
        shutil.chown(base, writer, group)
        yield base, group, writer, reader
    finally:
        for folder, mode in opened:
            try:
                os.removexattr(folder, "system.posix_acl_access")
            except OSError:
                pass
            os.chmod(folder, mode)
        for cmd in made:
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)
        for user in (writer, reader):  # torch's compile cache, made in /tmp for each user that imports it
            shutil.rmtree(Path(tempfile.gettempdir()) / ("torchinductor_" + user), ignore_errors=True)


def as_user(user: str, base: Path, *args: str, env: dict | None = None, code: str | None = None):
    """Run cachectl (or python -c `code`) as `user`, umask 022, as a shell would."""
    environ = {"PATH": os.environ["PATH"], "HOME": str(base / ("home-" + user)), "PYTHONPATH": str(REPO),
               "CACHECTL_ROOT": str(base / "store"), **(env or {})}
    cmd = [PY, "-c", code] if code is not None else [PY, "-m", "cachectl.cli", *args]
    setenv = ["%s=%s" % kv for kv in environ.items()]
    return subprocess.run(["runuser", "-u", user, "--", "env", "-i", *setenv, "sh", "-c", 'umask 022; exec "$@"', "sh",
                           *cmd], capture_output=True, text=True, timeout=600, cwd=base)


def check(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_a_group_shares_the_store_and_a_read_only_member_reads_everything(two_users):
    base, group, writer, reader = two_users
    gid = grp.getgrnam(group).gr_gid
    made = make_checkpoint(INSTALLED, SMALL)
    shutil.copyfile(made.path, base / "net.pth")
    state = torch.load(made.path, weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, base / "other.pth")
    for name in ("net", "other"):
        os.chmod(base / ("%s.pth" % name), 0o644)
    root = base / "store"

    # the daemon's account (here: cachectl add, as it) writes, with the usual umask 022
    check(as_user(writer, base, "init", "--group", group))
    check(as_user(writer, base, "add", str(base / "net.pth")))
    check(as_user(writer, base, "publish", "net", "--as", "%s.lamb_in1k" % SMALL))
    check(as_user(writer, base, "add", str(base / "other.pth")))

    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            st = os.lstat(os.path.join(dirpath, d))
            assert st.st_gid == gid and st.st_mode & stat.S_ISGID, os.path.join(dirpath, d)
            assert st.st_mode & 0o070 == 0o070, (os.path.join(dirpath, d), oct(st.st_mode))
        for f in filenames:
            path = os.path.join(dirpath, f)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            assert st.st_gid == gid and st.st_mode & 0o040, (path, oct(st.st_mode))
            if dirpath == str(root / "locks"):
                assert st.st_mode & 0o020, "lock file %s is not group-writable: %s" % (path, oct(st.st_mode))

    assert json.loads((root / "views" / "default" / "view.json").read_text())["format"] == 1

    # lock files are usable by both: each takes a lock the other made
    take = "from cachectl.store import Store; s = Store(%r)\nwith s.lock(%r, wait=False): print('locked')"
    for first, second in ((reader, writer), (writer, reader)):
        name = "made-by-" + first
        assert check(as_user(first, base, code=take % (str(root), name))).strip() == "locked"
        assert check(as_user(second, base, code=take % (str(root), name))).strip() == "locked"

    def reads_everything():
        rows = {r["version"]: r for r in json.loads(check(as_user(reader, base, "list", "--json")))}
        assert rows["net@1"]["state"] == "ready"
        shown = json.loads(check(as_user(reader, base, "show", "net", "--json")))
        assert shown["source"]["format"] not in (None, "None")
        path = Path(check(as_user(reader, base, "path", "net")).strip())
        assert path.is_file() and str(path).startswith(str(root))
        assert json.loads(check(as_user(reader, base, "path", "net", "--json")))["path"] == str(path)
        check(as_user(reader, base, "pins"))
        check(as_user(reader, base, "views", "list"))
        assert "mobilenetv3_small_050.lamb_in1k" in check(as_user(reader, base, "views", "list", "--json"))
        api = ("import cachectl, torch\nsd = cachectl.load_state_dict('net')\nm = cachectl.create_model('net')\n"
               "ref = torch.load(%r, weights_only=True)\n"
               "assert all(torch.equal(sd[k], ref[k]) for k in ref)\n"
               "assert torch.equal(m.state_dict()['conv_stem.weight'], ref['conv_stem.weight'])\nprint('api ok')"
               % str(base / "net.pth"))
        assert check(as_user(reader, base, code=api)).strip() == "api ok"
        # the view: the reader's unmodified timm loads the published name from it, offline
        variables = dict(line[len("export "):].split("=", 1)
                         for line in check(as_user(reader, base, "env", "activate", "default")).splitlines())
        pretrained = ("import timm, torch\nm = timm.create_model('%s.lamb_in1k', pretrained=True)\n"
                      "ref = torch.load(%r, weights_only=True)\n"
                      "assert torch.equal(m.state_dict()['conv_stem.weight'], ref['conv_stem.weight'])\nprint('view ok')"
                      % (SMALL, str(base / "net.pth")))
        assert check(as_user(reader, base, code=pretrained, env=variables)).strip() == "view ok"

    reads_everything()

    # read-only: the group loses write access; the reader still reads every command
    _ok("chmod", "-R", "g-w", str(root))
    check(as_user(writer, base, "env", "add", "later", "--python", PY))  # converts what its view serves only
    reads_everything()
    rows = {r["version"]: r for r in json.loads(check(as_user(reader, base, "list", "--json")))}
    assert rows["other@1"]["state"] == "pending"  # nothing converts it: it waits to be asked for
    result = as_user(reader, base, "path", "other", "--env", "later")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "other@1 is not converted for environment later yet" in lines[0]
    assert "user %s" % reader in lines[0] and "Ask user %s to run: cachectl path other@1 --env later" % writer in lines[0]


def test_a_view_written_under_a_private_umask_is_read_by_another_member(two_users):
    base, group, _, reader = two_users
    made = make_checkpoint(INSTALLED, SMALL)
    root = base / "store"
    gid = grp.getgrnam(group).gr_gid
    runner = CliRunner()
    before = os.umask(0o077)  # the writer keeps its own files private; the store's modes decide
    try:
        for args in (["init", "--group", group], ["add", made.path, "--name", "net"],
                     ["publish", "net", "--as", "%s.lamb_in1k" % SMALL]):
            result = runner.invoke(main, ["--root", str(root), *map(str, args)], catch_exceptions=False)
            assert result.exit_code == 0, result.output
    finally:
        os.umask(before)
    view = root / "views" / "default"
    files = []
    for dirpath, dirnames, filenames in os.walk(view):
        for d in dirnames:
            st = os.lstat(os.path.join(dirpath, d))
            assert st.st_gid == gid and st.st_mode & stat.S_ISGID and st.st_mode & 0o070 == 0o070, (d, oct(st.st_mode))
        files += [os.path.join(dirpath, f) for f in filenames]
    weights = [f for f in files if os.path.islink(f)]
    assert weights and any(f.endswith("config.json") for f in files) and (view / "view.json").is_file()
    # the other member reads every file of the view, the weights through their links
    read = "import sys\nfor f in sys.argv[1:]:\n    open(f, 'rb').read(1)\nprint(len(sys.argv) - 1)"
    result = subprocess.run(["runuser", "-u", reader, "--", PY, "-c", read, *files], capture_output=True, text=True,
                            cwd=base)
    assert result.returncode == 0 and result.stdout.strip() == str(len(files)), result.stderr


def test_a_views_update_keeps_a_snapshot_being_written_here_or_on_another_host(tmp_path):
    store = Store(tmp_path / "store").init()
    repo = store.root / "views" / "default" / "hub" / "models--timm--net"
    store.write_file(repo / "refs" / "main", b"current")
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    here = tempnames.this_host()
    # (snapshot, kept) all last written half an hour ago: past a snapshot's grace for
    # readers, within another host's lease
    cases = [("current", True), ("replaced", False),
             (".replaced@node7.cluster.pid%d.00aa11bb22cc.tmp" % dead.pid, True),
             (".replaced@%s.pid%d.0123456789ab.tmp" % (here, os.getpid()), True),
             (".replaced@%s.pid%d.ba9876543210.tmp" % (here, dead.pid), False),
             (".replaced.pid%d.tmp" % dead.pid, False)]
    then = time.time() - 1800
    for name, _ in cases:
        (repo / "snapshots" / name).mkdir(parents=True)
        os.utime(repo / "snapshots" / name, (then, then))
    views._drop_stale_snapshots(repo, time.time())
    assert sorted(p.name for p in (repo / "snapshots").iterdir()) == sorted(name for name, kept in cases if kept)


# -- locks chosen by the mount -------------------------------------------------------------

MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
60 27 0:50 / /shared rw,relatime - nfs4 srv:/export rw,vers=4.2,local_lock=none,addr=10.0.0.1
61 27 0:51 / /scratch rw,relatime - nfs srv:/scratch rw,vers=3,nolock,local_lock=all
62 27 0:52 / /home/u/remote rw,nosuid - fuse.sshfs u@host:/ rw,user_id=0
63 27 0:53 / /mnt/win rw - cifs //srv/share rw,vers=3.0
64 27 0:54 / /lustre rw - lustre mgs@tcp:/fs rw,flock
65 60 0:55 / /shared/with\\040space rw - nfs4 srv:/other rw,local_lock=flock
"""


@pytest.mark.parametrize("path, kind", [
    ("/var/lib/cachectl", "kernel"),
    ("/shared/cachectl", "kernel"),  # NFS that sends locks to its server
    ("/scratch/cachectl", "soft"),  # NFS mounted nolock: flock stays on this client
    ("/home/u/remote/store", "soft"),
    ("/mnt/win/store", "soft"),
    ("/lustre/store", "kernel"),
    ("/shared/with space/store", "soft"),  # the deeper mount wins, its name unescaped
])
def test_locks_follow_the_mount_the_store_is_on(tmp_path, path, kind):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    choice = locks.choose(Path(path), environ={}, mountinfo=info)
    assert choice.kind == kind, choice


def test_locks_on_this_machine_and_the_override(tmp_path, monkeypatch):
    monkeypatch.delenv("CACHECTL_LOCKS", raising=False)
    store = Store(tmp_path / "root").init()
    fstype = locks.mount_of(store.root, locks.mounts(Path("/proc/self/mountinfo").read_text())).fstype
    real = store.locking
    assert real.kind == locks.kind_for(locks.mount_of(store.root, locks.mounts(
        Path("/proc/self/mountinfo").read_text()))).kind and fstype in real.why
    with store.lock("x"):
        assert store.is_locked("x")
    monkeypatch.setenv("CACHECTL_LOCKS", "soft")
    soft = Store(tmp_path / "root")
    assert soft.locking.kind == "soft" and "CACHECTL_LOCKS" in soft.locking.why
    with soft.lock("y"):
        assert soft.is_locked("y") and Store(tmp_path / "root").is_locked("y")
    monkeypatch.setenv("CACHECTL_LOCKS", "flock")
    with pytest.raises(Exception, match="CACHECTL_LOCKS=flock is neither kernel nor soft"):
        Store(tmp_path / "root").lock("z").__enter__()


@pytest.mark.parametrize("kind", ["kernel", "soft"])
def test_a_lock_held_by_one_process_keeps_another_out_until_released(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("CACHECTL_LOCKS", kind)
    store = Store(tmp_path / "root").init()
    other = [sys.executable, "-c", "import sys, time; from cachectl.store import Store\n"
             "s = Store(sys.argv[1]); print('asking', flush=True)\n"
             "with s.lock('x'): print(time.time(), flush=True)", str(store.root)]
    with store.lock("x"):
        try:
            with store.lock("x", wait=False):
                pytest.fail("a second holder got a held lock")
        except CachectlError as exc:
            assert "x is busy" in str(exc)
        waiter = subprocess.Popen(other, stdout=subprocess.PIPE, text=True, env={**os.environ, "CACHECTL_LOCKS": kind})
        assert waiter.stdout.readline().strip() == "asking"  # started, whatever the machine's load
        time.sleep(0.5)
        assert waiter.poll() is None, "the other process took a held lock"
        released = time.time()
    out, _ = waiter.communicate(timeout=120)
    assert waiter.returncode == 0 and float(out) >= released
    with store.lock("x", wait=False):  # the waiter's release left it free
        pass


def test_locks_are_read_from_the_real_mount_the_store_is_on(tmp_path, monkeypatch):
    # no NFS server runs here (no nfsd): a tmpfs mounted for the test proves the store is
    # judged by its own mount, not by /; the NFS, CIFS and FUSE rules are the table above
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a filesystem for the test")
    monkeypatch.delenv("CACHECTL_LOCKS", raising=False)
    point = tmp_path / "mnt"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "cachectl-test", str(point)]).returncode:
        pytest.skip("mount -t tmpfs is refused here")
    try:
        store = Store(point / "store").init()
        assert store.locking == locks.LockChoice("kernel", "tmpfs mount at %s" % point)
        with store.lock("x"):
            assert Store(point / "store").is_locked("x")
    finally:
        subprocess.run(["umount", str(point)])


def test_a_full_disk_is_one_line_and_leaves_no_half_file(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small filesystem for the test")
    from click.testing import CliRunner

    from cachectl.cli import main

    point = tmp_path / "small"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "cachectl-full", str(point)]).returncode:
        pytest.skip("mount -t tmpfs is refused here")
    try:
        made = make_checkpoint(INSTALLED, SMALL)  # about 6 MB: more than the disk holds
        result = CliRunner().invoke(main, ["--root", str(point), "add", str(made.path)])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "no space left on" in result.output.lower() and "cachectl prune" in result.output
        assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output
        assert not [p for p in point.rglob("*") if p.is_file() and p.name != "CACHEDIR.TAG"]
    finally:
        subprocess.run(["umount", str(point)])
