"""cachectl against what users would do instead, as ratios measured in one run.

    nice -n 10 python -m benchmarks.bench [--quick] [--sizes '100 MB,400 MB']     (make bench)

Everything runs in one warm process, as the daemon's workers do (torch, timm and the
catalog imported and loaded once). For each source, made here with real timm models and
deleted after its rows:
  - convert: what the daemon does per environment for a file already in the store,
    `Cache.convert_for` from the stored blob to a published converted entry and the
    environment's new link to it, fsync included, after a first conversion of the model
    (which pays the target model's description and, for a migration, its math proof, once
    per process)
  - copy: `shutil.copyfile` of the same stored blob, without and with the sync policy of
    a conversion (fsync of the file and of its folder)
  - file to file: `cachectl.convert()` as `cachectl convert` runs it, which hashes the
    source for the output's provenance on the other core (median of up to 3 settled runs)
  - by hand: timm's own `create_model(pretrained=True)` from the file, then
    safetensors `save_file`, without fsync (what a user would script)
Each run times a copy, a synced copy and a conversion one after the other, each begun on
a settled disk (os.sync() first, untimed); a ratio is the median over runs of that run's
own ratio, so a disk that slows for a few seconds slows both sides of it. Small files get
more runs (their times are the noisiest).
Sources: "as-is" are made by the installed timm and need no key changes; "migrated" are
made by timm 0.6.13 (the release the tests use, from .cache/timm) and need the swin
migration to load in the installed timm. The daemon's backlog is benchmarks/daemon.py.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def reps(size: int) -> int:
    """Runs per row: 9 up to 200 MB, 7 up to 600 MB, 5 beyond (each run copies the file twice).
    A virtual disk's throughput comes in bursts: one write of 800 MB took 0.3 s, then 0.8 s."""
    return 9 if size <= 200e6 else 7 if size <= 600e6 else 5


@dataclass(frozen=True)
class Source:
    kind: str  # "as-is" or "migrated"
    model: str
    size: str  # the size class it stands for
    release: str | None  # the timm that makes it; None: the installed one
    note: str = ""


SOURCES = [
    Source("as-is", "resnet50", "100 MB", None),
    Source("as-is", "vit_base_patch16_224", "400 MB", None),
    Source("as-is", "vit_large_patch16_224", "1.2 GB", None),
    Source("as-is", "vit_huge_patch14_224", "2.5 GB", None),
    Source("migrated", "swin_tiny_patch4_window7_224", "100 MB", "0.6.13"),
    Source("migrated", "swin_base_patch4_window7_224", "400 MB", "0.6.13"),
    # the largest Swin of 0.6.13; no Swin of 1.2 GB exists
    Source("migrated", "swin_large_patch4_window7_224", "1.2 GB", "0.6.13", "0.8 GB: the largest swin v1"),
    Source("migrated", "swinv2_cr_huge_224", "2.5 GB", "0.6.13"),
]
QUICK = [s for s in SOURCES if s.size == "100 MB"]
# bytes of a float32 state dict, to say the disk needed before making anything
PARAMS = {"resnet50": 25.6e6, "vit_base_patch16_224": 86.6e6, "vit_large_patch16_224": 304.3e6,
          "vit_huge_patch14_224": 632.0e6, "swin_tiny_patch4_window7_224": 28.3e6,
          "swin_base_patch4_window7_224": 87.8e6, "swin_large_patch4_window7_224": 196.5e6,
          "swinv2_cr_huge_224": 657.8e6}

MAKE = (
    "import sys, timm, torch\n"
    "from safetensors.torch import save_file\n"
    "torch.manual_seed(0)\n"
    "sd = {k: v.contiguous() for k, v in timm.create_model(sys.argv[1]).state_dict().items()}\n"
    "save_file(sd, sys.argv[2]); torch.save(sd, sys.argv[3])\n"
)


def disk_needed(sources: list[Source]) -> int:
    """At most: one model's two sources, the stored blob, one output and one copy at a time."""
    return int(max(PARAMS[s.model] for s in sources) * 4 * 5)


def make(source: Source, folder: Path) -> tuple[Path, Path]:
    """(safetensors, zip .pth) of `source.model`, random init, saved by its release."""
    from tools.crossversion import python_for

    python = str(python_for(source.release)) if source.release else sys.executable
    folder = folder.absolute()
    st, pth = folder / (source.model + ".safetensors"), folder / (source.model + ".pth")
    subprocess.run([python, "-c", MAKE, source.model, str(st), str(pth)], check=True, cwd=folder)
    return st, pth


def _sync(path: Path) -> None:
    for p, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY)):
        fd = os.open(p, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _settled(fn) -> float:
    """`fn` timed from a disk with nothing left to write: what the run before it left dirty
    (an unsynced copy of 2.5 GB, files it deleted) is not charged to it."""
    os.sync()
    return _clock(fn)


def _forget(cache, link) -> None:
    """Remove one converted entry (its file and manifest) and the link to it, so the next
    convert_for converts as for a file the environment has not seen."""
    c = cache.store.get_converted(link.converted)
    cache.store.converted_path(c).unlink()
    cache.store.remove_converted(link.converted)
    cache.store.remove_link(link.env, link.source)


def _by_hand(model: str, src: Path, out: Path) -> float | str:
    import timm
    from safetensors.torch import save_file

    start = time.perf_counter()
    try:
        m = timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(file=str(src)))
    except Exception as exc:  # timm's own loader refusing the file is a result, not a bench failure
        return "fails (%s)" % type(exc).__name__
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, out)
    seconds = time.perf_counter() - start
    del m
    out.unlink()
    return seconds


@dataclass(frozen=True)
class Row:
    source: Source
    fmt: str
    size: int
    runs: int
    copy: float  # seconds, the median over runs
    copy_sync: float
    convert: float
    over_copy: float  # convert / copy, the median over runs of each run's ratio
    over_copy_sync: float
    how: str  # linked, or the runs of the source a written conversion copied
    read: float  # reading the stored blob (header, lazy tensors): a fixed cost of each conversion
    sha256: float  # hashing the stored blob's bytes once: what naming the output by content costs
    file_to_file: float
    by_hand: float | str


def measure(source: Source, src: Path, work: Path) -> Row:
    from cachectl.cache import Cache
    from cachectl.convert import convert
    from cachectl.reader import read
    from cachectl.store import sha256_file

    with Cache(work / "root") as cache:
        added = cache.add(src)  # ingest, identify and the model's first conversion: untimed
        link = added.links[0]
        if link.error:
            raise SystemExit("bench: %s does not convert: %s" % (src.name, link.error))
        env, sha = cache.env(link.env), added.source.sha256
        blob = cache.store.blob_path(sha)
        copies, synced, converts = [], [], []
        runs = reps(src.stat().st_size)
        for _ in range(runs):
            copy = work / "copy"
            copies.append(_settled(lambda: shutil.copyfile(blob, copy)))
            copy.unlink()
            synced.append(_settled(lambda: (shutil.copyfile(blob, copy), _sync(copy))))
            copy.unlink()
            _forget(cache, link)
            converts.append(_settled(lambda: cache.convert_for(sha, env)))
        converted = cache.store.get_converted(cache.store.get_link(env.name, sha).converted)
        read_s = _clock(lambda: read(blob))
        sha_s = _clock(lambda: sha256_file(blob))
        out = work / "out.safetensors"
        files, results = [], []
        for _ in range(min(runs, 3)):  # the same settled start as the rows it sits beside
            files.append(_settled(lambda: results.append(convert(src, out, cache.target(env), catalog=cache.catalog))))
            out.unlink()
        result, file_to_file = results[-1], statistics.median(files)
    shutil.rmtree(work / "root")
    how = "linked" if converted.size == 0 else "%d runs copied" % result.source_runs
    by_hand = _by_hand(source.model, src, work / "hand.safetensors")
    median = statistics.median
    return Row(source, src.suffix, src.stat().st_size, runs, median(copies), median(synced), median(converts),
               median(c / s for c, s in zip(converts, copies)), median(c / s for c, s in zip(converts, synced)),
               how, read_s, sha_s, file_to_file, by_hand)


def conversions(sources: list[Source], work: Path) -> list[Row]:
    rows = []
    for source in sources:
        folder = work / "sources"
        folder.mkdir()
        try:
            for src in make(source, folder):
                rows.append(measure(source, src, work))
                print("  %s %s %s done" % (source.kind, source.model, src.suffix), file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(folder)
    return rows


def conversion_table(rows: list[Row]) -> list[str]:
    def ratio(a, b):
        return "%.3f" % (a / b) if isinstance(a, float) else "-"

    out = [
        "## Conversion in a warm process, against a copy of the same file",
        "Times: medians over runs; convert / copy: the median of each run's own ratio.",
        "",
        "| source | model | input | size | runs | copy s | copy+sync s | convert s | convert / copy | convert / copy+sync "
        "| how | read s | sha256 s | file to file s | file to file / copy+sync | by hand s | convert / by hand |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hand = "%.2f" % r.by_hand if isinstance(r.by_hand, float) else r.by_hand
        out.append("| %s | %s%s | %s | %.0f MB | %d | %.3f | %.3f | %.3f | %.3f | %.3f | %s | %.3f | %.3f | %.3f | %s | %s | %s |" % (
            r.source.kind, r.source.model, " (%s)" % r.source.note if r.source.note else "", r.fmt, r.size / 1e6, r.runs,
            r.copy, r.copy_sync, r.convert, r.over_copy, r.over_copy_sync, r.how,
            r.read, r.sha256, r.file_to_file, ratio(r.file_to_file, r.copy_sync), hand, ratio(r.convert, r.by_hand)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the 100 MB sources and a backlog of 50 files")
    parser.add_argument("--sizes", help="the conversion table alone, for these size classes (e.g. '100 MB,400 MB')")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",")] if args.sizes else None
    sources = [s for s in SOURCES if s.size in sizes] if sizes else QUICK if args.quick else SOURCES
    if not sources:
        raise SystemExit("bench: no source of size %s (there are %s)" % (args.sizes, ", ".join(sorted({s.size for s in SOURCES}))))
    (ROOT / ".cache").mkdir(exist_ok=True)
    need, free = disk_needed(sources), shutil.disk_usage(ROOT / ".cache").free
    print("disk needed at most: %.1f GB under %s (free: %.1f GB)" % (need / 1e9, ROOT / ".cache", free / 1e9),
          file=sys.stderr, flush=True)
    if need > free:
        raise SystemExit("bench: not enough disk")
    from benchmarks import daemon

    lines = []
    with tempfile.TemporaryDirectory(prefix="bench-", dir=ROOT / ".cache") as tmp:
        lines += conversion_table(conversions(sources, Path(tmp)))
    if not sizes:
        lines += [""] + daemon.section(files=50 if args.quick else 200)
        # in a process of its own, so the children it times inherit no memory (benchmarks/commands.py)
        lines += [""] + subprocess.run([sys.executable, "-m", "benchmarks.commands"], check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
