"""What the kernel's copy of a file's bytes costs, by how they move within a page and
whether the disk is started as they are written: the facts behind
cachectl/safetensors_io.py's header pad and cachectl/writeback.py.

    python -m benchmarks.kernel_copy [--mb 100]

Each line is a ratio to `shutil.copyfile` + fsync of the same file, in the same run (the
page cache warm, `sync` before each copy). "moved by N" copies to N bytes past the
source's place within a page; "runs" copies the file as 300 equal runs, as a zip `.pth`'s
records are copied. A filesystem with reflink (XFS, btrfs) shares extents instead and
shows other figures: run it there before changing the constants.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from cachectl.writeback import STEP, Writeback

ROOT = Path(__file__).resolve().parent.parent
REPS = 7


def _copy(src: Path, dst: Path, size: int, runs: int, moved: int, writeback: bool) -> None:
    step = size // runs
    with open(src, "rb") as s, open(dst, "wb", buffering=0) as d:
        d.write(b" " * moved)
        disk = Writeback(d.fileno()) if writeback else None
        at = 0
        while at < size:
            n = min(step, size - at)
            done = 0
            while done < n:
                chunk = min(n - done, disk.step) if disk else n - done
                done += os.copy_file_range(s.fileno(), d.fileno(), chunk, at + done)
                if disk:
                    disk.reached(moved + at + done)
            at += n
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
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache", prefix="bench-copy-") as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        with open(src, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        src.read_bytes()  # into the page cache
        base = _clock(lambda: _synced_copy(src, dst), dst)
        print("shutil.copyfile + fsync of %d MB: %.3f s" % (args.mb, base))
        print("| copied | fsync at the end only | disk started every %d MB |" % (STEP >> 20))
        print("|---|---|---|")
        for runs, moved in ((1, 0), (1, 8), (1, 16), (1, 24), (1, 64), (1, 1000), (300, 0), (300, 64), (300, 1000)):
            ratios = [_clock(lambda: _copy(src, dst, size, runs, moved, wb), dst) / base for wb in (False, True)]
            print("| %s, moved by %d | %.2fx | %.2fx |" % ("the whole file" if runs == 1 else "%d runs" % runs, moved, *ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
