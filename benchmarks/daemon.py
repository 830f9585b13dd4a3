"""Daemon throughput: 200 small checkpoints dropped at once, with 1 and 2 workers, and the
time from a file's close to its converted entry being ready when the daemon is idle.

Each file is renamed into the watched folder (how rsync delivers), so its arrival is
one event; "ready" is the default environment's link to a converted file in the store.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cachectl.store import Store

SMALL = "mobilenetv3_small_050"  # 6 MB


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


def _ready(store: Store) -> int:
    folder = store.links / "default"
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def _start(root: Path, inbox: Path, workers: int) -> subprocess.Popen:
    env = dict(os.environ, CACHECTL_ROOT=str(root))
    proc = subprocess.Popen([sys.executable, "-m", "cachectld", "--watch", str(inbox), "--workers", str(workers),
                             "--quiet-seconds", "1", "--queue-size", "1000"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status = root / "cachectld.status.json"
    while not status.exists():
        time.sleep(0.1)
    return proc


def _wait(store: Store, count: int, timeout: float = 1800) -> float:
    start = time.perf_counter()
    while _ready(store) < count:
        if time.perf_counter() - start > timeout:
            raise SystemExit("daemon benchmark: only %d of %d ready after %d s" % (_ready(store), count, timeout))
        time.sleep(0.02)
    return time.perf_counter() - start


def run(n: int = 200) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(dir=Path.cwd() / ".cache") as tmp:
        tmp = Path(tmp)
        staged = tmp / "staged"
        staged.mkdir()
        files = _checkpoints(staged, n + 1)
        for workers in (1, 2):
            root, inbox = tmp / ("root%d" % workers), tmp / ("inbox%d" % workers)
            inbox.mkdir()
            proc = _start(root, inbox, workers)
            store = Store(root)
            try:
                # one file first: the workers import torch and load the catalog once
                os.link(files[n], inbox / ".warm.tmp")
                os.rename(inbox / ".warm.tmp", inbox / "warm.pth")
                _wait(store, 1)
                if workers == 1:
                    idle = []
                    for i in range(5):
                        os.link(files[i], inbox / (".idle%d.tmp" % i))
                        start = time.perf_counter()
                        os.rename(inbox / (".idle%d.tmp" % i), inbox / ("idle%d.pth" % i))
                        _wait(store, 2 + i)
                        idle.append(time.perf_counter() - start)
                    results["close_to_ready_s"] = sorted(idle)[len(idle) // 2]
                    base = 6
                else:
                    base = 1
                for i, f in enumerate(files[:n]):
                    os.link(f, inbox / (".drop%d.tmp" % i))
                start = time.perf_counter()
                for i in range(n):
                    os.rename(inbox / (".drop%d.tmp" % i), inbox / ("drop%03d.pth" % i))
                # the idle files of the 1-worker run are among the dropped bytes: count new links only
                expected = base + n - (5 if workers == 1 else 0)
                seconds = _wait(store, expected)
                results["files_per_s_%d_workers" % workers] = (expected - base) / seconds
                results["seconds_%d_workers" % workers] = seconds
            finally:
                proc.terminate()
                proc.wait(timeout=120)
    return results


def close_to_ready(big: Path) -> float:
    """Seconds from a large file's arrival (renamed in) to its converted entry, daemon idle."""
    with tempfile.TemporaryDirectory(dir=Path.cwd() / ".cache") as tmp:
        tmp = Path(tmp)
        root, inbox = tmp / "root", tmp / "inbox"
        inbox.mkdir()
        warm = _checkpoints(tmp, 1)[0]
        proc = _start(root, inbox, 1)
        store = Store(root)
        try:
            os.link(warm, inbox / ".warm.tmp")
            os.rename(inbox / ".warm.tmp", inbox / "warm.pth")
            _wait(store, 1)
            os.link(big, inbox / ".big.tmp")
            start = time.perf_counter()
            os.rename(inbox / ".big.tmp", inbox / big.name)
            _wait(store, 2)
            return time.perf_counter() - start
        finally:
            proc.terminate()
            proc.wait(timeout=120)


if __name__ == "__main__":
    print(run())
