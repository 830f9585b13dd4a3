"""The real daemon as a process: files copied in every way people copy them, crashes, signals, systemd.

Every wait is for a condition, with a generous timeout; nothing asserts how long anything took.
"""
import hashlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from cachectl.cache import Cache
from cachectl.cli import main as cachectl
import conftest
from conftest import alive

SMALL = "mobilenetv3_small_050"
HUB_REPO = "models--timm--%s.lamb_in1k" % SMALL
WAIT = 180  # seconds: a loaded CI machine, a cold torch import in each worker


# -- checkpoints -------------------------------------------------------------------------


class _RunsCode:
    """What a hostile pickle holds: loading it with weights_only=False would run a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch %s" % self.marker,))


@pytest.fixture(scope="session")
def make(tmp_path_factory):
    """make(i) -> a small real timm checkpoint; each i has its own bytes. make(i, 'safetensors') too."""
    import timm

    folder = tmp_path_factory.mktemp("checkpoints")
    base = timm.create_model(SMALL).state_dict()
    made = {}

    def get(i: int, fmt: str = "pth") -> Path:
        if (i, fmt) not in made:
            state = {k: v + i if v.is_floating_point() else v for k, v in base.items()}
            path = folder / ("%d.%s" % (i, fmt))
            if fmt == "safetensors":
                save_file(state, path)
            else:
                torch.save(state, path)
            made[i, fmt] = path
        return made[i, fmt]

    return get


@pytest.fixture(scope="session")
def big(tmp_path_factory):
    """A checkpoint large enough that its conversion can be caught half-way (about 100 MB)."""
    import timm

    path = tmp_path_factory.mktemp("big") / "resnet50.pth"
    torch.save(timm.create_model("resnet50").state_dict(), path)
    return path


def write_slowly(src: Path, dst: Path, pause: float, pieces: int = 8) -> None:
    """scp, or rsync --inplace: one open file, growing in bursts, closed at the end."""
    data = src.read_bytes()
    step = len(data) // pieces + 1
    with open(dst, "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i:i + step])
            f.flush()
            time.sleep(pause)


def rename_into_place(src: Path, dst: Path) -> None:
    """rsync: a hidden temporary beside the destination, renamed when complete."""
    tmp = dst.with_name(".%s.Xa12Bc" % dst.name)
    shutil.copyfile(src, tmp)
    os.rename(tmp, dst)


def hub_cache(folder: Path, weights: Path) -> Path:
    """A Hugging Face hub cache holding one timm repo: blobs, a snapshot of links, refs."""
    repo = folder / "hub" / HUB_REPO
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snapshot = repo / "snapshots" / "5d0f2b6c"
    snapshot.mkdir(parents=True)
    for name, data in (("model.safetensors", weights.read_bytes()),
                       ("config.json", json.dumps({"architecture": SMALL, "num_classes": 1000}).encode())):
        sha = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / sha).write_bytes(data)
        (snapshot / name).symlink_to("../../blobs/" + sha)
    (repo / "refs" / "main").write_text(snapshot.name)
    return folder / "hub"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the daemon --------------------------------------------------------------------------


wait_for = functools.partial(conftest.wait_for, timeout=WAIT)


class Daemon:
    def __init__(self, proc: subprocess.Popen, root: Path, log: Path):
        self.proc, self.root, self.log = proc, root, log

    def status(self) -> dict:
        try:
            return json.loads((self.root / "cachectld.status.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def results(self, path: Path) -> list[dict]:
        return [r for r in self.status().get("recent", []) if r["path"] == str(path)]

    def result(self, path: Path, count: int = 1) -> dict:
        """The `count`th result for `path`, once there."""
        got = wait_for(lambda: len(self.results(path)) >= count and self.results(path), "result %d for %s" % (count, path), self)
        return got[count - 1]

    def failure(self, path: Path) -> dict | None:
        return next((r for r in self.status().get("failures", []) if r["path"] == str(path)), None)

    def idle_worker(self, other_than: int | None = None) -> int:
        def find():
            return next((w["pid"] for w in self.status().get("workers", [])
                         if w["state"] == "idle" and w["pid"] != other_than), None)

        return wait_for(find, "an idle worker", self)

    def converting(self, path: Path) -> bool:
        return any(w["path"] == str(path) for w in self.status().get("in_flight", []))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its workers die with it (PDEATHSIG)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start(tmp_path):
    """start(*args, env=...) -> a running cachectld on tmp_path/root; stopped after the test, whatever happens."""
    started: list[Daemon] = []
    root = tmp_path / "root"

    def run(*args, env: dict | None = None, command: tuple = ("-m", "cachectld")) -> Daemon:
        log = tmp_path / ("daemon-%d.log" % len(started))
        environ = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        environ["CACHECTL_ROOT"] = str(root)
        environ.update(env or {})
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, *command, *map(str, args)], stdout=out,
                                    stderr=subprocess.STDOUT, env=environ, start_new_session=True)
        daemon = Daemon(proc, root, log)
        started.append(daemon)
        wait_for(lambda: daemon.status().get("pid") == proc.pid or proc.poll() is not None, "the status file", daemon)
        assert proc.poll() is None, log.read_text()
        return daemon

    yield run
    for daemon in started:
        daemon.stop()


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cachectl, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def listing(root: Path) -> dict:
    code, out = cli("--root", root, "list", "--json")
    assert code == 0, out
    return {r["version"]: r for r in json.loads(out)}


def files_in(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


# -- the tests ---------------------------------------------------------------------------


@pytest.mark.slow
def test_every_way_of_copying_in_is_converted_once(start, make, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    d = start("--watch", inbox, "--quiet-seconds", 2, "--rescan-seconds", 1)
    marker = tmp_path / "code-ran"

    shutil.copyfile(make(1), inbox / "plain.pth")
    write_slowly(make(2), inbox / "slow.pth", pause=0.5)  # pauses shorter than quiet_seconds
    rename_into_place(make(3, "safetensors"), inbox / "renamed.safetensors")
    shutil.copytree(hub_cache(tmp_path / "elsewhere", make(4, "safetensors")), inbox / "hub", symlinks=True)
    (inbox / "corrupt.pth").write_bytes(make(5).read_bytes()[:100_000])
    torch.save({"conv_stem.weight": torch.zeros(1), "x": _RunsCode(marker)}, tmp_path / "hostile.pth")
    shutil.copyfile(tmp_path / "hostile.pth", inbox / "hostile.pth")
    snapshot = inbox / "hub" / HUB_REPO / "snapshots" / "5d0f2b6c"
    for path in ("plain.pth", "slow.pth", "renamed.safetensors", snapshot, "corrupt.pth", "hostile.pth"):
        d.result(inbox / path)

    # the same bytes again under the same name, and under another name
    shutil.copyfile(make(1), inbox / "plain.pth")
    shutil.copyfile(make(1), inbox / "twin.pth")
    assert d.result(inbox / "plain.pth", count=2)["new_version"] is False
    assert d.result(inbox / "twin.pth")["ok"]

    rows = listing(d.root)
    hub_name = HUB_REPO.split("--")[-1]
    assert sorted(rows) == sorted(["plain@1", "slow@1", "renamed@1", hub_name + "@1", "twin@1"])
    assert all(r["state"] == "ready" and r["environments"] == ["default"] for r in rows.values())
    assert rows["twin@1"]["sha256"] == rows["plain@1"]["sha256"] == sha256(make(1))
    assert rows["slow@1"]["sha256"] == sha256(make(2))  # the whole file: not taken while written
    with Cache(d.root) as cache:
        assert len(cache.store.all_converted()) == 4  # one per distinct content
    assert [r["ok"] for r in d.results(inbox / "slow.pth")] == [True]
    assert len(d.results(inbox / "renamed.safetensors")) == 1

    assert "damaged or truncated torch file" in d.failure(inbox / "corrupt.pth")["error"]
    assert "refused: unpickling it would run code" in d.failure(inbox / "hostile.pth")["error"]
    assert not marker.exists()
    code, out = cli("--root", d.root, "status", "--json")
    report = json.loads(out)
    assert code == 0 and report["running"] is True and d.proc.poll() is None
    assert report["daemon"]["watch"] == [{"path": str(inbox), "polling": False, "why": "inotify"}]
    assert {f["path"] for f in report["daemon"]["failures"]} == {str(inbox / "corrupt.pth"), str(inbox / "hostile.pth")}
    code, out = cli("--root", d.root, "status")
    assert "running, up " in out and "corrupt.pth: " in out and "damaged or truncated" in out

    # a rescan takes nothing again: not what is stored, not what failed unchanged
    def idle():
        st = d.status()
        return st["queued"] == 0 and st["waiting"] == 0 and not st["in_flight"]

    wait_for(idle, "the daemon to finish what it was given", d)
    time.sleep(3)  # longer than quiet_seconds: a late second take of a copy shows by now
    wait_for(idle, "the daemon to finish what it was given", d)
    before = files_in(inbox)
    results = d.status()["recent"]
    after = time.time()
    wait_for(lambda: (d.status().get("scanned") or 0) > after, "a full rescan", d)
    assert d.status()["recent"] == results

    # the watched folder was only read
    assert files_in(inbox) == before
    assert set(before) == {"plain.pth", "slow.pth", "renamed.safetensors", "corrupt.pth", "hostile.pth", "twin.pth",
                           *(str(p.relative_to(inbox)) for p in (inbox / "hub").rglob("*")), "hub"}

    # one daemon per store
    second = subprocess.run([sys.executable, "-m", "cachectld", "--watch", inbox], capture_output=True, text=True,
                            env=dict(os.environ, CACHECTL_ROOT=str(d.root)), timeout=120)
    assert second.returncode == 1 and "another cachectld (pid %d" % d.proc.pid in second.stderr


@pytest.mark.slow
def test_polling_waits_for_the_writer_and_sees_renames(start, make, tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "team").mkdir(parents=True)
    d = start("--watch", inbox, "--polling", "on", "--poll-interval", 0.2, "--quiet-seconds", 2)
    assert d.status()["watch"] == [{"path": str(inbox), "polling": True, "why": "polling = on"}]
    d.idle_worker()
    write_slowly(make(11), inbox / "team" / "slow.pth", pause=0.6)  # longer than a poll, shorter than quiet
    rename_into_place(make(12), inbox / "team" / "renamed.pth")
    shutil.copyfile(make(13), inbox / "copied.pth")
    for name in ("team/slow.pth", "team/renamed.pth", "copied.pth"):
        assert d.result(inbox / name)["ok"], d.results(inbox / name)
    assert len(d.results(inbox / "team" / "slow.pth")) == 1
    rows = listing(d.root)
    assert sorted(rows) == ["copied@1", "renamed@1", "slow@1"]
    assert rows["slow@1"]["sha256"] == sha256(make(11)) and rows["slow@1"]["state"] == "ready"


@pytest.mark.slow
def test_files_present_at_start_are_taken_and_a_restart_repeats_nothing(start, make, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copyfile(make(21), inbox / "early.pth")
    d = start("--watch", inbox, "--quiet-seconds", 0.5)
    assert d.result(inbox / "early.pth")["ok"]
    assert d.stop() == 0
    d = start("--watch", inbox, "--quiet-seconds", 0.5)
    d.idle_worker()
    shutil.copyfile(make(22), inbox / "later.pth")
    assert d.result(inbox / "later.pth")["ok"]
    assert len(d.results(inbox / "early.pth")) == 1  # from the first run: not taken again
    assert sorted(listing(d.root)) == ["early@1", "later@1"]


@pytest.mark.slow
def test_default_folder_is_the_inbox_of_the_store_created_on_a_fresh_machine(start, make, tmp_path):
    d = start("--quiet-seconds", 0.5)
    inbox = tmp_path / "root" / "inbox"
    assert inbox.is_dir() and d.status()["watch"][0]["path"] == str(inbox)
    d.idle_worker()
    shutil.copyfile(make(31), inbox / "dropped.pth")
    assert d.result(inbox / "dropped.pth")["ok"]
    assert listing(d.root)["dropped@1"]["state"] == "ready"


@pytest.mark.slow
def test_cachectl_daemon_runs_the_same_daemon_on_its_root(start, make, tmp_path):
    inbox, other_root = tmp_path / "inbox", tmp_path / "root"
    inbox.mkdir()
    d = start("--root", other_root, "daemon", "--watch", inbox, "--quiet-seconds", 0.5,
              command=("-m", "cachectl.cli"), env={"CACHECTL_ROOT": str(tmp_path / "not-this-one")})
    d.idle_worker()
    shutil.copyfile(make(91), inbox / "via_cli.pth")
    assert d.result(inbox / "via_cli.pth")["ok"]
    assert listing(other_root)["via_cli@1"]["state"] == "ready"
    assert d.stop() == 0


@pytest.mark.slow
def test_sigkill_mid_conversion_then_restart_finishes_with_no_partial_entry(start, big, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    d = start("--watch", inbox, "--quiet-seconds", 0.5)
    worker = d.idle_worker()
    blobs = d.root / "store-v1" / "blobs"
    # named as its model: an anonymous resnet50 is refused, its look-alikes compute differently
    shutil.copyfile(big, inbox / "resnet50.pth")
    # freeze the worker the moment it writes into the store (or is seen converting), then kill the daemon
    wait_for(lambda: any(blobs.rglob(".*.tmp")) or d.converting(inbox / "resnet50.pth"), "the conversion to start", d,
             timeout=WAIT)
    os.kill(worker, signal.SIGSTOP)
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    wait_for(lambda: not alive(worker), "the worker to die with the daemon")
    with Cache(d.root) as cache:  # what a reader sees now: temporaries at most, no half entry
        assert cache.verify() == []
        assert all(r.state != "failed" for r in cache.rows())

    d = start("--watch", inbox, "--quiet-seconds", 0.5)
    assert d.result(inbox / "resnet50.pth")["ok"]
    rows = listing(d.root)
    assert list(rows) == ["resnet50@1"] and rows["resnet50@1"]["state"] == "ready"
    assert rows["resnet50@1"]["sha256"] == sha256(big)
    with Cache(d.root) as cache:
        assert cache.verify() == []  # every blob hashes to its name and loads strictly
        assert len(cache.store.all_converted()) == 1


@pytest.mark.slow
def test_a_crash_or_a_timeout_fails_only_its_file_and_a_change_retries_it(start, make, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    d = start("--watch", inbox, "--quiet-seconds", 0.5, "--task-timeout-seconds", 10)

    # a worker that segfaults while it holds a file (stopped first, so it holds it for sure)
    worker = d.idle_worker()
    os.kill(worker, signal.SIGSTOP)
    shutil.copyfile(make(41), inbox / "crash.pth")
    wait_for(lambda: d.converting(inbox / "crash.pth"), "crash.pth to be sent to the worker", d)
    os.kill(worker, signal.SIGSEGV)
    os.kill(worker, signal.SIGCONT)
    crashed = d.result(inbox / "crash.pth")
    assert not crashed["ok"] and "the worker converting it was killed by SIGSEGV" in crashed["error"]

    # a worker that never finishes
    worker = d.idle_worker(other_than=worker)
    os.kill(worker, signal.SIGSTOP)
    shutil.copyfile(make(42), inbox / "stuck.pth")
    stuck = d.result(inbox / "stuck.pth")
    assert not stuck["ok"] and "took longer than task_timeout_seconds = 10" in stuck["error"]
    wait_for(lambda: not alive(worker), "the stuck worker to be killed", d)

    # the daemon goes on, and does not retry the failures until they change
    d.idle_worker(other_than=worker)
    shutil.copyfile(make(43), inbox / "fine.pth")
    assert d.result(inbox / "fine.pth")["ok"]
    assert len(d.results(inbox / "crash.pth")) == 1 and d.failure(inbox / "crash.pth")
    os.utime(inbox / "crash.pth")
    assert d.result(inbox / "crash.pth", count=2)["ok"]
    assert d.failure(inbox / "crash.pth") is None and d.failure(inbox / "stuck.pth")
    assert sorted(listing(d.root)) == ["crash@1", "fine@1"]
    assert d.proc.poll() is None


@pytest.mark.slow
def test_memory_limit_then_sighup_reloads_settings_and_folders(start, big, make, tmp_path):
    inbox, more = tmp_path / "inbox", tmp_path / "more"
    inbox.mkdir()
    more.mkdir()
    settings = tmp_path / "cachectld.toml"
    settings.write_text('watch = ["inbox"]\nquiet_seconds = 0.5\nmemory_limit_mb = 20\n')
    d = start("--config", settings)
    d.idle_worker()
    shutil.copyfile(big, inbox / "resnet50.pth")  # ~100 MB: more than 20 MB of room
    failed = d.result(inbox / "resnet50.pth")
    assert not failed["ok"] and "ran out of memory" in failed["error"] and "memory_limit_mb" in failed["error"]
    assert d.proc.poll() is None

    settings.write_text('watch = ["inbox", "more"]\nquiet_seconds = 0.5\nmemory_limit_mb = 0\n')
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: [w["path"] for w in d.status().get("watch", [])] == [str(inbox), str(more)],
             "the new folder to be watched", d)
    shutil.copyfile(make(51), more / "new.pth")
    assert d.result(more / "new.pth")["ok"]
    os.utime(inbox / "resnet50.pth")  # changed: taken again, now without the limit
    assert d.result(inbox / "resnet50.pth", count=2)["ok"]

    settings.write_text("workers = 'many'\n")  # a bad reload keeps what runs
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in d.log.read_text(), "the reload to be refused", d)
    assert "workers must be a whole number" in d.log.read_text() and d.proc.poll() is None


@pytest.mark.slow
def test_sigterm_lets_work_in_flight_finish(start, make, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    d = start("--watch", inbox, "--quiet-seconds", 0.5, "--stop-grace-seconds", 120)
    worker = d.idle_worker()
    os.kill(worker, signal.SIGSTOP)
    shutil.copyfile(make(61), inbox / "late.pth")
    wait_for(lambda: d.converting(inbox / "late.pth"), "late.pth to be sent to the worker", d)
    d.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping: 1 converting" in d.log.read_text(), "the daemon to start stopping", d)
    os.kill(worker, signal.SIGCONT)
    assert d.proc.wait(timeout=WAIT) == 0
    status = d.status()
    assert status["stopped"] and [r["ok"] for r in status["recent"]] == [True]
    assert listing(d.root)["late@1"]["state"] == "ready"
    code, out = cli("--root", d.root, "status")
    assert code == 3 and "not running" in out


@pytest.mark.slow
def test_sigterm_kills_work_past_the_grace_period_and_it_is_taken_again(start, make, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    d = start("--watch", inbox, "--quiet-seconds", 0.5, "--stop-grace-seconds", 1)
    worker = d.idle_worker()
    os.kill(worker, signal.SIGSTOP)
    shutil.copyfile(make(71), inbox / "cut.pth")
    wait_for(lambda: d.converting(inbox / "cut.pth"), "cut.pth to be sent to the worker", d)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=WAIT) == 0
    assert not alive(worker)
    assert d.status()["recent"] == []  # not a failure of the file: the daemon stopped
    d = start("--watch", inbox, "--quiet-seconds", 0.5)
    assert d.result(inbox / "cut.pth")["ok"]


@pytest.mark.slow
@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_systemd_notify_protocol(start, make, tmp_path, abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = "cachectld-test-%d-%d" % (os.getpid(), time.monotonic_ns())
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify")
        sock.bind(address)
    sock.settimeout(0.2)
    lines: list[str] = []
    done = threading.Event()

    def receive():
        while not done.is_set():
            try:
                lines.extend(sock.recv(4096).decode().splitlines())
            except socket.timeout:
                continue

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    try:
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        d = start("--watch", inbox, "--quiet-seconds", 0.5, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "600000"})
        wait_for(lambda: "READY=1" in lines, "READY=1", d)
        wait_for(lambda: lines.count("WATCHDOG=1") >= 3, "three WATCHDOG=1", d)
        d.idle_worker()
        shutil.copyfile(make(81), inbox / "n.pth")
        wait_for(lambda: any(l.startswith("STATUS=") and "last: n.pth n@1" in l for l in lines), "STATUS= with n@1", d)
        assert all(l.split("=", 1)[0] in ("READY", "STATUS", "WATCHDOG", "STOPPING") for l in lines), lines
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=WAIT) == 0
        wait_for(lambda: "STOPPING=1" in lines, "STOPPING=1", d)
        assert lines.index("READY=1") < lines.index("STOPPING=1")
    finally:
        done.set()
        thread.join()
        sock.close()


def test_status_without_a_daemon(tmp_path):
    code, out = cli("--root", tmp_path, "status")
    assert code == 3 and "no daemon has run on this cache" in out
    code, out = cli("--root", tmp_path, "status", "--json")
    assert code == 3 and json.loads(out) == {"running": False, "daemon": None, "failed_entries": []}
