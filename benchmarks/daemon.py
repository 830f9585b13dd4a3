"""The daemon's backlog: small checkpoints dropped at once into a watched folder, three
environments (the installed timm, 0.9.16 and 0.6.13, from the releases the tests use),
with 1 and 2 workers; then where a worker's time goes, profiled in process.

    nice -n 10 python -m benchmarks.daemon [--files 200]

Each file is renamed into the watched folder (how rsync delivers), so its arrival is one
event; a file is done when every environment links it to a converted file. The profile
runs what a worker runs for each file, `Cache.add`, under cProfile, on files of the same
kind, after one warm-up file (the workers import torch and load the catalog once too).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cachectl.cache import Cache
from cachectl.store import Store

ROOT = Path(__file__).resolve().parent.parent
SMALL = "mobilenetv3_small_050"  # 6 MB
RELEASES = ("0.9.16", "0.6.13")  # beside the installed timm: three environments
PROFILED = 40

# Where a file's time goes: functions of the add path, each measured inclusively (an
# outer phase contains the inner ones listed after it).
PHASES = [
    ("Cache.add, the whole file", "cache.py", "add"),
    ("  ingest: copy into the store, sha256, fsync", "store.py", "ingest_file"),
    ("  read the checkpoint (header, lazy tensors)", "reader.py", "read"),
    ("  identify against the catalog", "cache.py", "_identify"),
    ("  convert for each environment", "cache.py", "convert_for"),
    ("    prepare: plan and strict check", "convert.py", "prepare"),
    ("      asking the target timm (agent round trips)", "target.py", "_call"),
    ("    write the converted file (source runs in 4 MB blocks, fsync)", "convert.py", "write_prepared"),
    ("  manifests (json + fsync each)", "store.py", "write_json"),
    ("  locks", "store.py", "lock"),
    ("  views refreshed", "cache.py", "refresh_views"),
    ("all fsync calls", "~", "<built-in method posix.fsync>"),
]


def _checkpoints(folder: Path, n: int) -> list[Path]:
    import timm

    state = timm.create_model(SMALL).state_dict()
    out = []
    for i in range(n):
        state["conv_stem.weight"][0, 0, 0, 0] = float(i)  # other bytes: another source
        path = folder / ("net%03d.pth" % i)
        torch.save(state, path)
        out.append(path)
    return out


def _environments(root: Path) -> list[str]:
    """Register the old releases' environments beside `default`; all their names."""
    from tools.crossversion import python_for

    with Cache(root) as cache:
        for release in RELEASES:
            cache.env_add("timm" + release.replace(".", ""), str(python_for(release)))
        return [e.name for e in cache.environments()]


def _ready(store: Store, envs: list[str]) -> int:
    """Files every environment links to a converted file (or to a reason it cannot)."""
    counts = []
    for env in envs:
        folder = store.links / env
        counts.append(len(list(folder.glob("*.json"))) if folder.is_dir() else 0)
    return min(counts)


def _start(root: Path, inbox: Path, workers: int) -> subprocess.Popen:
    env = dict(os.environ, CACHECTL_ROOT=str(root))
    proc = subprocess.Popen([sys.executable, "-m", "cachectld", "--watch", str(inbox), "--workers", str(workers),
                             "--quiet-seconds", "1", "--queue-size", "1000"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status = root / "cachectld.status.json"
    while not status.exists():
        if proc.poll() is not None:
            raise SystemExit("daemon benchmark: cachectld exited with %s" % proc.returncode)
        time.sleep(0.1)
    return proc


def _wait(store: Store, envs: list[str], count: int, timeout: float = 1800) -> float:
    start = time.perf_counter()
    while _ready(store, envs) < count:
        if time.perf_counter() - start > timeout:
            raise SystemExit("daemon benchmark: only %d of %d ready after %d s" % (_ready(store, envs), count, timeout))
        time.sleep(0.02)
    return time.perf_counter() - start


def _drop(src: Path, inbox: Path, name: str) -> None:
    os.link(src, inbox / ("." + name + ".tmp"))
    os.rename(inbox / ("." + name + ".tmp"), inbox / name)


def backlog(files: list[Path], tmp: Path, workers: int) -> float:
    """Files per second for a backlog of `files` dropped at once into an idle daemon."""
    root, inbox = tmp / ("root%d" % workers), tmp / ("inbox%d" % workers)
    inbox.mkdir()
    envs = _environments(root)
    store = Store(root)
    proc = _start(root, inbox, workers)
    try:
        _drop(files[-1], inbox, "warm.pth")  # the workers import torch, load the catalog, start agents
        _wait(store, envs, 1)
        for i, f in enumerate(files[:-1]):
            os.link(f, inbox / (".drop%d.tmp" % i))
        start = time.perf_counter()
        for i in range(len(files) - 1):
            os.rename(inbox / (".drop%d.tmp" % i), inbox / ("drop%03d.pth" % i))
        _wait(store, envs, len(files))
        seconds = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return (len(files) - 1) / seconds


def profile(files: list[Path], tmp: Path) -> tuple[float, list[tuple[str, float]]]:
    """(files per second in one process, [(phase, seconds per file)]) for Cache.add."""
    root = tmp / "profiled"
    _environments(root)
    with Cache(root) as cache:
        cache.add(files[-1])  # warm-up
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        for f in files[:PROFILED]:
            cache.add(f)
        prof.disable()
        seconds = time.perf_counter() - start
    stats = pstats.Stats(prof).stats
    phases = []
    for label, file, func in PHASES:
        total = sum(ct for (path, _, name), (_, _, _, ct, _) in stats.items() if name == func and path.endswith(file))
        phases.append((label, total / PROFILED))
    return PROFILED / seconds, phases


def section(files: int = 200) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="bench-daemon-", dir=ROOT / ".cache") as tmp:
        tmp = Path(tmp)
        staged = tmp / "staged"
        staged.mkdir()
        made = _checkpoints(staged, files + 1)
        rates = {w: backlog(made, tmp, w) for w in (1, 2)}
        in_process, phases = profile(made, tmp)
    per_file = dict(phases)["Cache.add, the whole file"]
    inner = [p for p in phases[1:] if not p[0].startswith("    ") and p[0] != "all fsync calls"]
    top = max(inner, key=lambda p: p[1])
    out = [
        "## The daemon: a backlog of %d %s checkpoints (6 MB), 3 environments (timm installed, %s)" % (
            files, SMALL, ", ".join(RELEASES)),
        "| measure | value |",
        "|---|---|",
        "| files per second, 1 worker | %.1f |" % rates[1],
        "| files per second, 2 workers | %.1f |" % rates[2],
        "| 2 workers / 1 worker | %.2f |" % (rates[2] / rates[1]),
        "| files per second, Cache.add in one process under cProfile (%d files) | %.1f |" % (PROFILED, in_process),
        "",
        "### Where a file's time goes (Cache.add under cProfile, ms per file; inclusive, nested by indent)",
        "| phase | ms per file | share of the file |",
        "|---|---|---|",
    ]
    for label, seconds in phases:
        out.append("| %s | %.1f | %.0f%% |" % (label.replace("  ", "&nbsp;&nbsp;"), seconds * 1000, 100 * seconds / per_file))
    out.append("bottleneck: %s (%.0f%% of a file's time)" % (top[0].strip(), 100 * top[1] / per_file))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200)
    args = parser.parse_args(argv)
    print("\n".join(section(args.files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
