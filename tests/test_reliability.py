"""Attacked and still standing: hostile inputs, SIGKILLs, a full disk, two daemons on one store.

Every input of tests/hostile.py goes through `cachectl inspect`, `convert` and `add` (each a
process of its own, killed at a deadline) and through a real `cachectld`. Counted, printed
at the end of the module and asserted zero: code executions (a payload's marker file),
tracebacks, hangs, half entries, entries lost or stuck `converting`.

`make torture` runs it longer: CACHECTL_TORTURE=N multiplies the rounds of kills and the
sizes of the large inputs, and runs every case through the installed `cachectl` executable.
In the default run, each case runs in a process forked from an interpreter that has
imported cachectl once (the same entry point, without paying torch's import 280 times);
a sample runs through the executable, so the two are proven to agree.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

import conftest
from conftest import alive

pytestmark = pytest.mark.reliability

TORTURE = int(os.environ.get("CACHECTL_TORTURE", "0") or 0)
SCALE = max(1, TORTURE)
CASE_TIMEOUT = 60.0  # seconds: any run past it is a hang, killed with its process group
EXECUTABLE = Path(sys.executable).with_name("cachectl")
# run through the executable in the default run too (one command each): one of each way a case can go wrong
SAMPLE = {"fifo.pth": "inspect", "payload_zip_system.pth": "add", "st_shape_huge.safetensors": "convert",
          "a[/]b.pth": "add"}
SMALL = "mobilenetv3_small_050"
WAIT = 240.0


@dataclass
class Figures:
    inputs: int = 0
    runs: int = 0
    executions: int = 0
    tracebacks: int = 0
    hangs: int = 0
    raw_control: int = 0  # outputs carrying a terminal escape or control character from a file name
    kills: int = 0
    half_entries: int = 0
    lost: int = 0
    stuck: int = 0
    longest: tuple[float, str] = (0.0, "")
    slowest: list = None  # (seconds, command) of the slowest runs

    def __post_init__(self):
        self.slowest = []

    def line(self) -> str:
        return ("reliability: %d inputs, %d runs; %d code executions, %d tracebacks, %d hangs, %d raw control "
                "characters; %d kills survived; %d half entries, %d entries lost, %d stuck converting; "
                "longest case %.1f s (%s)" % (
                    self.inputs, self.runs, self.executions, self.tracebacks, self.hangs, self.raw_control,
                    self.kills, self.half_entries, self.lost, self.stuck, self.longest[0], self.longest[1]))


FIGURES = Figures()


@pytest.fixture(scope="module", autouse=True)
def report(request):
    started = time.monotonic()
    yield
    text = "\n%s; %.0f s in all\nslowest runs: %s" % (
        FIGURES.line(), time.monotonic() - started, "; ".join("%.1f s cachectl %s" % r for r in FIGURES.slowest))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(text, flush=True)  # to the terminal, passed or failed


# -- running cachectl ------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    args: tuple[str, ...]
    code: int | None  # None: killed at the deadline
    out: str
    err: str
    seconds: float

    @property
    def hung(self) -> bool:
        return self.code is None


_PRELOAD = ("cachectl.cli", "cachectl.cache", "cachectl.reader", "cachectl.inspection", "cachectl.convert",
            "cachectl.identify", "cachectl.target", "cachectl.views", "cachectl.prune", "safetensors.torch")


def _forked(args: list[str], out: Path, err: Path) -> int:
    """cachectl's entry point in a forked child, as the executable would run it: its pid.

    What every run would import is imported here once (imports start no threads, so the
    fork is safe); the catalog is read once too."""
    if "cachectl.cli" not in sys.modules:
        import importlib

        for module in _PRELOAD:
            importlib.import_module(module)
        from cachectl.catalog import Catalog

        catalog = Catalog.load()
        catalog.largest_layout(), catalog.classifier_specs()
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        os.setpgid(0, 0)  # a group of its own: a deadline kills it and whatever it started
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False, buffering=1)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        from cachectl.cli import main

        try:
            main.main(args=args, prog_name="cachectl")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # what an uncaught exception prints in the executable
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def run(*args, tmp: Path, real: bool | None = None, timeout: float = CASE_TIMEOUT) -> Run:
    """`cachectl ARGS`, killed (with its group) after `timeout`; counted in FIGURES."""
    args = tuple(str(a) for a in args)
    real = bool(TORTURE) if real is None else real
    out, err = tmp / ".run.out", tmp / ".run.err"
    started = time.monotonic()
    if real:
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen([str(EXECUTABLE), *args], stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                                    start_new_session=True)
        pid = proc.pid
    else:
        pid = _forked(list(args), out, err)
    code = _wait(pid, timeout)
    if code is None:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    seconds = time.monotonic() - started
    result = Run(args, code, out.read_text(errors="replace"), err.read_text(errors="replace"), seconds)
    FIGURES.runs += 1
    FIGURES.hangs += result.hung
    FIGURES.tracebacks += "Traceback (most recent call last)" in result.err + result.out
    FIGURES.raw_control += any(c in result.out + result.err for c in "\x1b\x07\r\u202e")
    if seconds > FIGURES.longest[0]:
        FIGURES.longest = (seconds, "cachectl %s" % " ".join(args))
    FIGURES.slowest = sorted(FIGURES.slowest + [(round(seconds, 1), " ".join(args))], reverse=True)[:5]
    return result


def _wait(pid: int, timeout: float) -> int | None:
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > end:
            return None
        time.sleep(0.01)


def problem(result: Run) -> str | None:
    """What is wrong with how a run ended, for a person; None if it ended as it should."""
    if result.hung:
        return "hung (killed after %.0f s)" % result.seconds
    if "Traceback" in result.err + result.out:
        return "traceback:\n" + result.err[-3000:]
    lines = result.err.strip().splitlines()
    if result.code == 1 and not lines and result.args[-2] == "add" and "failed: " in result.out:
        return None  # stored, and its conversion failed: add's own report, one line per environment
    if result.code == 2 and lines and lines[-1].startswith("Error: Invalid value"):
        return None  # click's answer to an argument it refuses (a dangling link): usage, then one line
    if result.code != 0 and (len(lines) != 1 or not result.err.startswith("Error: ")):
        return "not one line: %r" % result.err[-2000:]
    return None


# -- the corpus ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    kind: str
    valid: bool


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Built in a process of its own: this one forks cachectl, and must not have run torch's threads."""
    folder = tmp_path_factory.mktemp("corpus")
    built = subprocess.run([sys.executable, "-m", "tests.hostile", str(folder), str(SCALE), "--json"],
                           capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=600)
    assert built.returncode == 0, built.stderr
    cases = [Case(c["name"], Path(c["path"]), c["kind"], c["valid"]) for c in map(json.loads, built.stdout.splitlines())]
    FIGURES.inputs = len(cases)
    return folder, cases


def snapshot(folder: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def markers(folder: Path) -> list[str]:
    return sorted(os.listdir(folder / "ran"))


def store_leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".*.tmp")]


# -- hostile inputs through the CLI ------------------------------------------------------------


def test_every_hostile_input_is_one_line_through_inspect_convert_and_add(corpus, tmp_path):
    folder, cases = corpus
    before = snapshot(folder)
    root = tmp_path / "root"
    out = tmp_path / "out"
    out.mkdir()
    failures = []
    added = []
    assert run("--root", root, "init", tmp=tmp_path).code == 0
    for i, case in enumerate(cases):
        real = {command: True if SAMPLE.get(case.name) == command else None for command in ("inspect", "add", "convert")}
        runs = [run("inspect", case.path, tmp=tmp_path, real=real["inspect"]),
                run("--root", root, "add", case.path, tmp=tmp_path, real=real["add"])]
        if TORTURE or i % 3 == 0 or case.name in SAMPLE:
            # convert reads as add does (inspect reads headers alone): in the default run, a third of the cases
            runs.append(run("convert", case.path, "-o", out / ("%d.safetensors" % i), tmp=tmp_path,
                            real=real["convert"]))
        for r in runs:
            why = problem(r)
            if why is None and r.code == 0 and not case.valid:
                why = "accepted a hostile input (exit 0): %s" % r.out[-500:]
            if why:
                failures.append("%s (%s) %s: %s" % (case.name, case.kind, r.args[0] if r.args[0] != "--root" else "add",
                                                    why))
        if runs[1].code == 0 or "added " in runs[1].out:
            added.append(case)
    assert not failures, "\n".join(failures)
    # what the cache holds reads back, whatever its names are
    listing = run("--root", root, "list", "--json", tmp=tmp_path)
    assert problem(listing) is None and listing.code == 0, listing.err
    rows = json.loads(listing.out)
    for r in (run("--root", root, "list", tmp=tmp_path, real=True),
              *(run("--root", root, "show", "--", row["version"], tmp=tmp_path) for row in rows)):
        if problem(r) or r.code != 0:
            failures.append("%s: %s" % (" ".join(r.args[2:]), problem(r) or r.err))
    verify = run("--root", root, "verify", tmp=tmp_path)
    FIGURES.executions += len(markers(folder))
    FIGURES.stuck += sum(row["state"] == "converting" for row in rows)
    FIGURES.half_entries += len(store_leftovers(root)) + (verify.code != 0)
    FIGURES.lost += max(0, len(added) - len(rows))
    assert not failures, "\n".join(failures)
    assert markers(folder) == []
    assert verify.code == 0, verify.out + verify.err
    assert store_leftovers(root) == []
    assert all(row["state"] != "converting" for row in rows)
    assert snapshot(folder) == before, "a watched folder was written to"


# -- the daemon ------------------------------------------------------------------------------


class Daemon:
    """A real cachectld on `root`, its log in `log`."""

    def __init__(self, root: Path, log: Path, *args):
        self.root, self.log = root, log
        environ = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        with open(log, "a") as out:
            self.proc = subprocess.Popen([str(EXECUTABLE.with_name("cachectld")), "--root", str(root), *map(str, args)],
                                         stdout=out, stderr=subprocess.STDOUT, env=environ, start_new_session=True)
        wait_for(lambda: self.status().get("pid") == self.proc.pid or self.proc.poll() is not None, "its status", self)
        assert self.proc.poll() is None, log.read_text()[-3000:]

    def status(self) -> dict:
        try:
            return json.loads((self.root / "cachectld.status.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def done(self) -> dict:
        try:
            return json.loads((self.root / "cachectld.seen.json").read_text())["done"]
        except (FileNotFoundError, ValueError, KeyError):
            return {}

    def results(self, path: Path) -> list[dict]:
        return [r for r in self.status().get("recent", []) if r["path"] == str(path)]

    def workers(self) -> list[dict]:
        return self.status().get("workers", [])

    def idle(self) -> bool:
        st = self.status()
        return bool(st) and st["queued"] == 0 and st["waiting"] == 0 and not st["in_flight"]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


wait_for = functools.partial(conftest.wait_for, timeout=WAIT)


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(root: Path, log: Path, *args) -> Daemon:
        started.append(Daemon(root, log, *args))
        return started[-1]

    yield start
    for d in started:
        d.stop()


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir("/proc/%d/task" % p):
                with open("/proc/%d/task/%s/children" % (p, task)) as f:
                    kids = {int(k) for k in f.read().split()}
                todo += kids - out
                out |= kids
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def test_every_hostile_input_through_a_daemon(corpus, tmp_path, daemons):
    folder, cases = corpus
    before = snapshot(folder)
    # what the daemon must take and answer: every case that is a regular file or a snapshot folder inside its folder
    expected = {str(c.path) for c in cases if c.kind != "special" and not c.path.name.startswith(".")}
    root = tmp_path / "root"
    d = daemons(root, tmp_path / "daemon.log", "--watch", folder, "--quiet-seconds", 0.5,
                "--task-timeout-seconds", CASE_TIMEOUT)
    started = time.monotonic()
    wait_for(lambda: expected <= set(d.done()) and d.idle(), "a result for every input", d, timeout=WAIT * 2)
    FIGURES.longest = max(FIGURES.longest, (max((r["seconds"] for r in d.status()["recent"]), default=0),
                                            "the daemon's slowest file"))
    log = d.log.read_text()
    hung = [r for r in d.status()["failures"] if "took longer than" in (r["error"] or "")]
    FIGURES.runs += len(expected)
    FIGURES.tracebacks += log.count("Traceback")
    FIGURES.hangs += len(hung)
    FIGURES.executions += len(markers(folder))
    listing = run("--root", root, "list", "--json", tmp=tmp_path)
    rows = json.loads(listing.out)
    verify = run("--root", root, "verify", tmp=tmp_path)
    FIGURES.stuck += sum(row["state"] == "converting" for row in rows)
    FIGURES.half_entries += (verify.code != 0) + len(store_leftovers(root))
    assert d.proc.poll() is None, "the daemon died"
    assert "Traceback" not in log, log[-6000:]
    assert markers(folder) == []
    assert not hung, hung
    assert verify.code == 0, verify.out + verify.err
    assert store_leftovers(root) == []
    assert all(row["state"] != "converting" for row in rows)
    assert snapshot(folder) == before, "a watched folder was written to"
    print("daemon: %d inputs answered in %.0f s" % (len(expected), time.monotonic() - started))


# -- kills ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """make(i) -> a small real timm checkpoint of its own bytes, made in a process of its own."""
    folder = tmp_path_factory.mktemp("checkpoints")
    count = 4 + 4 * SCALE
    script = ("import sys, torch, timm; base = timm.create_model(%r).state_dict()\n"
              "for i in range(%d):\n"
              "    torch.save({k: v + i if v.is_floating_point() else v for k, v in base.items()}, "
              "sys.argv[1] + '/%s-%%d.pth' %% i)" % (SMALL, count, SMALL))
    subprocess.run([sys.executable, "-c", script, str(folder)], check=True, timeout=600)
    return [folder / ("%s-%d.pth" % (SMALL, i)) for i in range(count)]


def check_store(root: Path, tmp: Path) -> list[str]:
    """What is wrong with the store after a kill: verify's problems, entries stuck converting."""
    problems = []
    verify = run("--root", root, "verify", tmp=tmp)
    if verify.code != 0:
        problems.append("verify: " + verify.out + verify.err)
        FIGURES.half_entries += 1
    listing = run("--root", root, "list", "--json", tmp=tmp)
    stuck = [r["version"] for r in json.loads(listing.out or "[]") if r["state"] == "converting"]
    FIGURES.stuck += len(stuck)
    if stuck:
        problems.append("stuck converting with nothing converting them: %s" % stuck)
    return problems


def test_sigkill_of_add_at_random_moments(checkpoints, tmp_path):
    root = tmp_path / "root"
    assert run("--root", root, "init", tmp=tmp_path).code == 0
    rng = random.Random(12)
    rounds = 2 * SCALE
    problems = []
    for i in range(rounds):
        ckpt = checkpoints[i]
        add = subprocess.Popen([str(EXECUTABLE), "--root", str(root), "add", str(ckpt)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        end = time.monotonic() + rng.uniform(1.0, 12.0)
        children: set[int] = set()
        while time.monotonic() < end and add.poll() is None:
            children |= descendants(add.pid)  # the target interpreter it starts
            time.sleep(0.05)
        if add.poll() is not None:
            continue  # finished before its moment came
        add.kill()
        add.wait()
        FIGURES.kills += 1
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(c) for c in children):
            time.sleep(0.1)
        orphans = [c for c in children if alive(c)]
        if orphans:
            problems.append("round %d: the target interpreter %s outlived the killed add by 5 s" % (i, orphans))
        problems += ["round %d: %s" % (i, p) for p in check_store(root, tmp_path)]
        # what the killed add was doing is finished by adding again
        again = run("--root", root, "add", ckpt, tmp=tmp_path, real=True, timeout=300)
        if again.code != 0:
            problems.append("round %d: adding again failed: %s" % (i, again.err))
    rows = json.loads(run("--root", root, "list", "--json", tmp=tmp_path).out)
    lost = {ckpt.name.rsplit(".", 1)[0] for ckpt in checkpoints[:rounds]} - {r["name"] for r in rows if r["state"] == "ready"}
    FIGURES.lost += len(lost)
    assert not problems, "\n".join(problems)
    assert not lost, lost


def test_sigkill_of_the_daemon_and_of_a_worker(checkpoints, tmp_path, daemons):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    root = tmp_path / "root"
    rng = random.Random(7)
    log = tmp_path / "daemon.log"
    problems = []
    files = iter(checkpoints)
    for i in range(SCALE):
        # the daemon, killed at a random moment of a conversion; its workers and their helpers go with it
        d = daemons(root, log, "--watch", inbox, "--quiet-seconds", 0.5)
        path = inbox / ("d%d-%s" % (i, next(files).name))
        src = next(files)
        path.write_bytes(src.read_bytes())
        wait_for(lambda: any(w["path"] == str(path) for w in d.status().get("in_flight", [])), "the conversion", d)
        time.sleep(rng.uniform(0.0, 4.0))
        family = descendants(d.proc.pid)
        d.kill()
        FIGURES.kills += 1
        wait_for(lambda: not any(alive(p) for p in family), "the daemon's workers and helpers to die with it", d,
                 timeout=10)
        problems += ["daemon kill %d: %s" % (i, p) for p in check_store(root, tmp_path)]
        d = daemons(root, log, "--watch", inbox, "--quiet-seconds", 0.5)
        wait_for(lambda: path.as_posix() in d.done() and d.idle(), "the file to be taken again after the restart", d)
        ok = [r for r in d.results(path) if r["ok"]]
        if not ok:
            problems.append("daemon kill %d: %s not converted after the restart: %s" % (i, path, d.results(path)))

        # a worker, killed while it converts: only its file fails, the next one converts, a restart retries it
        victim, after = inbox / ("w%d-victim.pth" % i), inbox / ("w%d-after.pth" % i)
        victim.write_bytes(next(files).read_bytes())
        wait_for(lambda: any(w["path"] == str(victim) for w in d.status().get("in_flight", [])), "the conversion", d)
        time.sleep(rng.uniform(0.0, 2.0))
        worker = next((w["pid"] for w in d.status()["in_flight"] if w["path"] == str(victim)), None)
        if worker is not None and alive(worker):
            os.kill(worker, signal.SIGKILL)
            FIGURES.kills += 1
        after.write_bytes(next(files).read_bytes())
        wait_for(lambda: {str(victim), str(after)} <= set(d.done()) | {r["path"] for r in d.status()["recent"]}
                 and d.idle(), "both files to be answered", d)
        if not any(r["ok"] for r in d.results(after)):
            problems.append("worker kill %d: the next file failed too: %s" % (i, d.results(after)))
        problems += ["worker kill %d: %s" % (i, p) for p in check_store(root, tmp_path)]
        d.stop()
        d = daemons(root, log, "--watch", inbox, "--quiet-seconds", 0.5)
        wait_for(lambda: d.idle() and str(victim) in d.done(), "the killed worker's file to be retried", d)
        if not any(r["ok"] for r in d.results(victim)) and not any(r["ok"] for r in d.status()["recent"]
                                                                     if r["path"] == str(victim)):
            problems.append("worker kill %d: %s not retried after a restart" % (i, victim))
        d.stop()
    rows = json.loads(run("--root", root, "list", "--json", tmp=tmp_path).out)
    FIGURES.lost += sum(r["state"] != "ready" for r in rows)
    assert "Traceback" not in log.read_text()
    assert not problems, "\n".join(problems)
    assert all(r["state"] == "ready" for r in rows), rows


# -- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs the test mounts (root only); skipped, saying why, where it cannot."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (%s): the full-disk case needs root or CAP_SYS_ADMIN"
                    % (made.stderr.strip() or "mount failed"))
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` until `leave` bytes are free; the filler file, to remove later."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\1" * max(0, free - leave))
    return filler


def test_a_full_disk_publishes_nothing_and_the_daemon_goes_on_once_there_is_room(checkpoints, small_disk, tmp_path,
                                                                                  daemons):
    root = small_disk / "root"
    assert run("--root", root, "init", tmp=tmp_path).code == 0
    ckpt = checkpoints[-1]
    filler = fill(small_disk, ckpt.stat().st_size // 2)
    full = run("--root", root, "add", ckpt, tmp=tmp_path, real=True, timeout=300)
    assert problem(full) is None and full.code == 1, full.err
    assert "no space left on %s, need about %d MB" % (small_disk, -(-ckpt.stat().st_size // 10**6)) in full.err, full.err
    assert store_leftovers(root) == [], "a temporary outlived the failed write"
    listing = run("--root", root, "list", "--json", tmp=tmp_path)
    assert json.loads(listing.out) == [], "something was published"

    # the daemon: the same answer, then the file is converted once room returns, without a restart
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    d = daemons(root, tmp_path / "daemon.log", "--watch", inbox, "--quiet-seconds", 0.5)
    path = inbox / ckpt.name
    path.write_bytes(ckpt.read_bytes())
    failed = wait_for(lambda: next((r for r in d.status().get("recent", []) if r["path"] == str(path)), None),
                      "the daemon to meet the full disk", d)
    assert not failed["ok"] and "no space left on %s" % small_disk in failed["error"], failed
    filler.unlink()
    wait_for(lambda: any(r["ok"] for r in d.results(path)), "the daemon to convert it once there is room", d)
    assert d.proc.poll() is None
    rows = json.loads(run("--root", root, "list", "--json", tmp=tmp_path).out)
    assert [r["state"] for r in rows] == ["ready"], rows
    assert run("--root", root, "verify", tmp=tmp_path).code == 0


# -- daemons on one store, and what no one may plant -----------------------------------------------


def test_daemons_on_one_store_and_planted_links(checkpoints, tmp_path, daemons):
    root = tmp_path / "root"
    inbox = root / "inbox"
    assert run("--root", root, "init", tmp=tmp_path).code == 0
    # a stale status naming pid 1, alive in every container, with a fresh time: it blocks no one
    status = root / "cachectld.status.json"
    status.write_text(json.dumps({"pid": 1, "host": os.uname().nodename, "started": time.time(), "updated": time.time(),
                                  "root": str(root), "config": None, "watch": [], "workers": [], "queued": 0,
                                  "waiting": 0, "recent": [], "failures": [], "format": 1}))
    # two daemons started at one moment: exactly one runs, the other says who does, in one line
    cmd = [str(EXECUTABLE.with_name("cachectld")), "--root", str(root), "--quiet-seconds", "0.5"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for _ in range(2)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs), "one of two daemons to give way", timeout=120)
        time.sleep(3)
        running = [p for p in procs if p.poll() is None]
        refused = [p for p in procs if p.poll() is not None]
        assert len(running) == 1 and len(refused) == 1, [p.poll() for p in procs]
        text = refused[0].stdout.read()
        assert refused[0].returncode == 1 and "another cachectld" in text and "Traceback" not in text, text
        wait_for(lambda: json.loads(status.read_text()).get("pid") == running[0].pid, "the running one's status")
        # a link planted at every name the status could be written through: nothing outside is written
        victim = tmp_path / "victim"
        victim.write_text("mine")
        for name in (".cachectld.status.json.pid%d.tmp" % running[0].pid, ".cachectld.seen.json.pid%d.tmp"
                     % running[0].pid):
            (root / name).symlink_to(victim)
        # a user's upload in progress in the inbox, and a checkpoint dropped beside it
        upload = inbox / ".upload.pth.tmp"
        upload.write_bytes(b"half")
        (inbox / "one.pth").write_bytes(checkpoints[0].read_bytes())
        wait_for(lambda: any(r["ok"] for r in json.loads(status.read_text()).get("recent", [])), "a conversion")
        time.sleep(6)  # more than one status write
        assert victim.read_text() == "mine"
        assert run("--root", root, "prune", "--keep-last", 1, "--yes", tmp=tmp_path).code == 0
        assert upload.read_bytes() == b"half", "prune touched a file in a watched folder"
        named = run("--root", root, "add", checkpoints[1], "--name", "../../x", tmp=tmp_path)
        assert named.code != 0 and problem(named) is None and not (tmp_path / "x.json").exists()
        # a private file, reached through a link, stays private in the store
        private = tmp_path / "private.pth"
        private.write_bytes(checkpoints[2].read_bytes())
        private.chmod(0o600)
        (tmp_path / "link.pth").symlink_to(private)
        added = run("--root", root, "add", tmp_path / "link.pth", "--json", tmp=tmp_path, timeout=300)
        assert added.code in (0, 1) and problem(added) is None, added.err
        blob = next(root.rglob(json.loads(added.out)["sha256"]))
        assert blob.stat().st_mode & 0o044 == 0, oct(blob.stat().st_mode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=90)
