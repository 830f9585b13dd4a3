"""`cachectl list --json` and `cachectl prune --dry-run` on a store of 10,000 entries.

    nice -n 10 python -m benchmarks.store_scan [--entries N] [--runs 3]

Builds the store with the store's own writers (fsync skipped: the files are the same,
made in seconds), then runs each command as a user does, interpreter start included,
and prints the median of the runs. Run it with PYTHONPATH at another checkout (say
`git archive HEAD`) to measure that code on the same store.
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


def build(root: Path, n: int) -> None:
    """n sources, each with a blob, a converted file and a link for `default`; n/10 names."""
    from cachectl.store import Converted, Environment, Link, Source, Store, Version

    timm = importlib.metadata.version("timm")
    now = time.time()
    with mock.patch("os.fsync"):
        store = Store(root).init()
        store.put_env(Environment("default", sys.executable, timm, importlib.metadata.version("torch"), now))
        shas = [hashlib.sha256(b"%d" % i).hexdigest() for i in range(n)]  # spread over blobs/00..ff
        for i, sha in enumerate(shas):
            store.put_source(Source(sha, 1000, "/inbox/m%d.pth" % i, now - i, "torch-zip", "resnet18", ("1.0.31",),
                                    "exact", 1000))
            for path in (store.blob_path(sha), store.blob_path(sha, ".safetensors")):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"x" * 1000)
            cid = "%s-l" % sha[:16]
            store.put_converted(Converted(cid, sha, "l", timm, "resnet18", {"num_classes": 1000}, sha, 1000, now,
                                          ("as-is",)))
            store.put_link(Link("default", sha, timm, cid, None, now))
        for j in range(n // 10):
            store.put_versions("m%d" % j, [Version("m%d" % j, v + 1, shas[j * 10 + v], now - (j * 10 + v), "/inbox")
                                           for v in range(10)])


def timed(args: list[str], root: Path, runs: int) -> float:
    env = dict(os.environ, CACHECTL_ROOT=str(root))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cachectl.cli", *args], env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
        print("list --json: %.2f s" % timed(["list", "--json"], root, args.runs))
        print("prune --dry-run --keep-last 3: %.2f s" % timed(["prune", "--dry-run", "--keep-last", "3"], root, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
