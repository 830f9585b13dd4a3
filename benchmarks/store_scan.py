"""The store scan behind `list`, `show`, `verify`, `rm` and `prune`, on a store of 10,000 entries.

    nice -n 10 python -m benchmarks.store_scan [--entries N] [--runs 3]

Builds the store with the store's own writers (fsync skipped: the same files, made in
seconds), then prints, each the median of --runs:
  - in one process: the cost floor (listing the store's folders and a stat of every
    manifest), a scan without the scan index (every manifest read), and scans through it;
  - whole process, as a user runs them: `cachectl list`, `list --json` and
    `prune --dry-run --keep-last 3`, beside `python -c pass`.
Run it with PYTHONPATH at another checkout (say `git archive HEAD`) to measure that code
on the same store.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import cachectl


def build(root: str | Path, n: int) -> None:
    """n entries as the store holds them after `cachectl add`: a source manifest, its blob, a
    converted file and its manifest, and the default environment's link each, in names of
    ten versions. Written by the store's own writers, without converting; the sha256s are
    real hashes, so blobs spread over the 256 folders as they do in use."""
    from cachectl.store import Converted, Environment, Link, Source, Store, Version

    timm = importlib.metadata.version("timm")
    now = time.time()
    with mock.patch("os.fsync"):
        store = Store(root).init()
        store.put_env(Environment("default", None, timm, importlib.metadata.version("torch"), now))
        shas = [hashlib.sha256(b"%d" % i).hexdigest() for i in range(n)]
        for i, sha in enumerate(shas):
            store.put_source(Source(sha, 1000, "/inbox/m%d.pth" % i, now - i, "torch-zip", "resnet18", (timm,),
                                    "exact", 1000))
            for path in (store.blob_path(sha), store.blob_path(sha, ".safetensors")):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"x" * 1000)
            cid = "%s-l" % sha[:16]
            store.put_converted(Converted(cid, sha, "l", timm, "resnet18", {"num_classes": 1000}, sha, 1000, now,
                                          ("as-is",)))
            store.put_link(Link("default", sha, timm, cid, None, now))
        for j in range((n + 9) // 10):
            store.put_versions("m%d" % j, [Version("m%d" % j, v + 1, shas[j * 10 + v], now - j * 10 - v, "/inbox")
                                           for v in range(min(10, n - j * 10))])


def floor(store) -> int:
    """What no scan can skip: list each folder the scan reads and stat every file in it."""
    count = 0
    for folder in [store.sources, store.converted, store.names, store.envs, store.pins,
                   *(e.path for e in os.scandir(store.links) if e.is_dir())]:
        for e in os.scandir(folder):
            e.stat()
            count += 1
    return count


def in_process(root: Path, runs: int) -> list[str]:
    from cachectl.scan import INDEX_NAME, scan
    from cachectl.store import Store

    def median(what, before=lambda: None) -> tuple[float, float]:
        walls, cpus = [], []
        for _ in range(runs):
            before()
            wall, cpu = time.perf_counter(), time.process_time()
            what()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        return statistics.median(walls), statistics.median(cpus)

    index = Store(root).base / INDEX_NAME
    files = floor(Store(root))
    lines = ["in one process (wall s, CPU s):",
             "  cost floor, %d files: folders listed, each file stat'ed: %.3f, %.3f" % ((files,) + median(
                 lambda: floor(Store(root))))]
    lines.append("  scan without the index (every manifest read, the index written): %.3f, %.3f" % median(
        lambda: scan(Store(root)), lambda: index.unlink(missing_ok=True)))
    time.sleep(3)  # what was written in the last seconds is not indexed yet
    scan(Store(root))
    lines.append("  scan through the index, nothing changed (a new process's first scan): %.3f, %.3f" % median(
        lambda: scan(Store(root))))
    store = Store(root)
    scan(store)
    lines.append("  scan again in the same process (the index remembered): %.3f, %.3f" % median(lambda: scan(store)))
    return lines


def timed(args: list[str], root: Path, runs: int) -> tuple[float, float]:
    """Median wall and CPU seconds of a whole process, after one run not counted."""
    env = dict(os.environ, CACHECTL_ROOT=str(root))
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
    walls, cpus = [], []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        walls.append(time.perf_counter() - start)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit("%s failed" % " ".join(args))
        cpus.append(usage.ru_utime + usage.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        start = time.perf_counter()
        build(root, args.entries)
        print("cachectl from %s" % Path(cachectl.__file__).parent)
        print("built %d entries in %.1f s" % (args.entries, time.perf_counter() - start))
        print("\n".join(in_process(root, args.runs)))
        cli = [sys.executable, "-m", "cachectl.cli"]
        for what, cmd in (("python -c pass", [sys.executable, "-c", "pass"]), ("list", cli + ["list"]),
                          ("list --json", cli + ["list", "--json"]),
                          ("prune --dry-run --keep-last 3", cli + ["prune", "--dry-run", "--keep-last", "3"])):
            print("%s: %.2f s wall, %.2f s CPU" % ((what,) + timed(cmd, root, args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
