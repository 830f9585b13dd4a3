"""How the bytes of a conversion are best written: the facts behind
cachectl/safetensors_io.py's blocks and cachectl/writeback.py.

    python -m benchmarks.write_path [--mb 100]

Each line is a ratio to `shutil.copyfile` + fsync of the same file, in the same run (the
page cache warm, `sync` before each copy). A conversion copies its source as runs (a zip
`.pth` one per tensor record, with zip headers between them), each "moved" some bytes
from its place within a page. `copy_file_range` copies each run in the kernel, as
cachectl did until 2026-12-01; "4 MB blocks" is what it does now: runs read with pread into
one buffer, written in whole blocks at multiples of 4 MB (`safetensors_io._Blocks`).
Run it on another filesystem (XFS, btrfs share extents on copy_file_range) before
changing the design.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from cachectl.safetensors_io import _Blocks
from cachectl.writeback import STEP, Writeback

ROOT = Path(__file__).resolve().parent.parent
REPS = 7
NEVER = 1 << 62  # a Writeback step no file reaches: the disk is left to the fsync


def _runs(size: int, runs: int) -> list[tuple[int, int]]:
    step = size // runs
    return [(at, min(step, size - at)) for at in range(0, size, step)]


def _kernel(src: Path, dst: Path, runs: list[tuple[int, int]], moved: int, writeback: bool) -> None:
    with open(src, "rb") as s, open(dst, "wb", buffering=0) as d:
        d.write(b" " * moved)
        with Writeback(d.fileno(), STEP if writeback else NEVER) as disk:
            for at, n in runs:
                done = 0
                while done < n:
                    done += os.copy_file_range(s.fileno(), d.fileno(), min(n - done, STEP), at + done)
                    disk.reached(moved + at + done)
        os.fsync(d.fileno())


def _blocks(src: Path, dst: Path, runs: list[tuple[int, int]], moved: int, writeback: bool) -> None:
    with open(src, "rb") as s, open(dst, "wb", buffering=0) as d:
        with Writeback(d.fileno(), STEP if writeback else NEVER) as disk:
            out = _Blocks(d.fileno(), disk, src)
            out.put(memoryview(b" " * moved))
            for at, n in runs:
                out.copy(s.fileno(), at, n)
            out.flush()
        os.fsync(d.fileno())


def _synced_copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clock(fn, dst: Path) -> float:
    times = []
    for _ in range(REPS):
        dst.unlink(missing_ok=True)
        os.sync()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    dst.unlink(missing_ok=True)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100, help="size of the file copied (default 100)")
    args = parser.parse_args(argv)
    size = args.mb << 20
    (ROOT / ".cache").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache", prefix="bench-write-") as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        with open(src, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        src.read_bytes()  # into the page cache
        base = _clock(lambda: _synced_copy(src, dst), dst)
        print("shutil.copyfile + fsync of %d MB: %.3f s" % (args.mb, base))
        print("| written by | runs, moved within a page | fsync at the end only | disk started every %d MB |" % (STEP >> 20))
        print("|---|---|---|---|")
        for runs, moved in ((1, 0), (1, 16), (300, 0), (300, 64), (3000, 64)):
            for name, fn in (("copy_file_range", _kernel), ("4 MB blocks", _blocks)):
                ratios = [_clock(lambda: fn(src, dst, _runs(size, runs), moved, wb), dst) / base for wb in (False, True)]
                print("| %s | %d, %d bytes | %.2fx | %.2fx |" % (name, runs, moved, *ratios), flush=True)
        print("shutil.copyfile + fsync again: %.3f s" % _clock(lambda: _synced_copy(src, dst), dst))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
