"""cachectl against what users would do instead, as ratios measured in one run.

    python -m benchmarks.bench [--quick]     (make bench)

Makes its own checkpoints with real timm models (about 100 MB to 2 GB) and prints, each
beside its target:
  1. convert time / `cp` time of the same file (safetensors and zip .pth inputs)
  2. convert time / the by-hand path (timm pretrained=True with a local file, then
     safetensors save_file)
  3. peak RSS of a conversion / largest tensor, and / file size
  4. inspect time per file size (header only: flat)
  5. daemon throughput: 200 small checkpoints at once, 1 and 2 workers (benchmarks/daemon.py)
  6. `cachectl list` and a prune plan on a store of 10,000 entries
Conversions run as `cachectl convert` subprocesses, as a user runs them; each time
includes the interpreter start, which the by-hand baseline pays as well.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# (model, approximate size): each made once, in both formats, cached under .cache/bench
MODELS = [("resnet50", "100 MB"), ("vit_base_patch16_224", "350 MB"), ("vit_large_patch16_224", "1.2 GB"),
          ("vit_huge_patch14_224", "2.5 GB")]
QUICK = MODELS[:2]
CACHE = ROOT / ".cache" / "bench"


@dataclass(frozen=True)
class Timed:
    seconds: float
    peak_rss: int  # bytes, the child's VmHWM


def _warm(path: Path) -> None:
    # Read every file once before each timed run so cp and convert start equal: both
    # from the page cache.
    with open(path, "rb") as f:
        while f.read(64 * 1024 * 1024):
            pass


def timed_rss(cmd: list[str]) -> Timed:
    """Wall time of `cmd` and its own peak RSS (wait4's rusage of that child alone)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit("benchmark step failed: %s\n%s" % (" ".join(cmd), err.decode()[-2000:]))
    return Timed(seconds, usage.ru_maxrss * 1024)


def make(model: str) -> tuple[Path, Path, int]:
    """(safetensors, zip .pth, largest tensor bytes) for `model`, with real timm init."""
    CACHE.mkdir(parents=True, exist_ok=True)
    st, pth = CACHE / ("%s.safetensors" % model), CACHE / ("%s.pth" % model)
    meta = CACHE / ("%s.json" % model)
    if not meta.exists():
        code = (
            "import json, sys, timm, torch\n"
            "from safetensors.torch import save_file\n"
            "m = timm.create_model(%r)\n"
            "sd = {k: v.contiguous() for k, v in m.state_dict().items()}\n"
            "save_file(sd, %r); torch.save(sd, %r)\n"
            "json.dump({'largest': max(v.numel() * v.element_size() for v in sd.values())}, open(%r, 'w'))\n"
        ) % (model, str(st), str(pth), str(meta))
        subprocess.run([sys.executable, "-c", code], check=True)
    return st, pth, json.loads(meta.read_text())["largest"]


BY_HAND = (
    "import sys, timm\n"
    "from safetensors.torch import save_file\n"
    "m = timm.create_model(sys.argv[1], pretrained=True, pretrained_cfg_overlay=dict(file=sys.argv[2]))\n"
    "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[3])\n"
)


def bench_conversions(models, work: Path) -> list[tuple]:
    rows = []
    for model, label in models:
        st, pth, largest = make(model)
        for src in (st, pth):
            size = src.stat().st_size
            _warm(src)
            cp = timed_rss(["cp", str(src), str(work / "copy")])
            _warm(src)
            conv = timed_rss([str(BIN / "cachectl"), "convert", str(src), "-o", str(work / "out.safetensors")])
            _warm(src)
            hand = timed_rss([sys.executable, "-c", BY_HAND, model, str(src), str(work / "hand.safetensors")])
            insp = timed_rss([str(BIN / "cachectl"), "inspect", str(src), "--json"])
            rows.append((model, label, src.suffix, size, largest, cp, conv, hand, insp))
            for f in ("copy", "out.safetensors", "hand.safetensors"):
                (work / f).unlink(missing_ok=True)
            print("  %s %s done" % (model, src.suffix), file=sys.stderr, flush=True)
    return rows


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_convert_in_process(models, work: Path) -> list[tuple]:
    """Conversion as the daemon runs it (imports, catalog and target agent already warm),
    against cp of the same file with and without fsync; and how much anonymous memory
    the conversion adds (file-backed mmap pages are page cache, not the process's)."""
    import threading

    from cachectl.convert import convert
    from cachectl.target import Target

    out = []
    with Target() as target:
        convert(make(models[0][0])[0], work / "warm.safetensors", target)
        for model, label in models:
            st, pth, largest = make(model)
            for src in (st, pth):
                _warm(src)
                start = time.perf_counter()
                shutil.copyfile(src, work / "copy")
                cp = time.perf_counter() - start
                with open(work / "copy", "rb+") as f:
                    os.fsync(f.fileno())
                cp_sync = time.perf_counter() - start
                (work / "copy").unlink()
                _warm(src)
                base, peak, stop = _rss_anon(), [0], threading.Event()

                def sample():
                    while not stop.is_set():
                        peak[0] = max(peak[0], _rss_anon())
                        time.sleep(0.002)

                sampler = threading.Thread(target=sample)
                sampler.start()
                start = time.perf_counter()
                convert(src, work / "out.safetensors", target)
                conv = time.perf_counter() - start
                stop.set()
                sampler.join()
                (work / "out.safetensors").unlink()
                out.append((model, src.suffix, src.stat().st_size, largest, cp, cp_sync, conv, max(0, peak[0] - base), base))
    return out


def bench_inspect_in_process(models) -> list[tuple]:
    """inspect's own work, without interpreter start: read + identify, per file size."""
    from cachectl.catalog import Catalog
    from cachectl.identify import identify
    from cachectl.reader import read

    catalog = Catalog.load()
    identify(read(make(models[0][0])[0]), catalog)  # load the catalog once, as a daemon would
    out = []
    for model, label in models:
        for src in make(model)[:2]:
            start = time.perf_counter()
            for _ in range(5):
                identify(read(src), catalog)
            out.append((model, src.suffix, src.stat().st_size, (time.perf_counter() - start) / 5))
    return out


def bench_store(n: int = 10_000) -> tuple[float, float, float]:
    """(seconds to build, `list --json` seconds, prune plan seconds) on a store of n entries."""
    from cachectl.prune import Policy, plan
    from cachectl.store import Converted, Link, Source, Store, Version

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "root").init()
        start = time.perf_counter()
        now = time.time()
        for i in range(n):
            sha = "%064x" % i
            store.put_source(Source(sha, 1000, "/inbox/m%d.pth" % i, now - i, "torch-zip", "resnet18", ("1.0.31",), "exact", 1000))
            blob = store.blob_path(sha)
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(b"x")
            store.put_converted(Converted("%s-l" % sha[:16], sha, "l", "1.0.31", "resnet18", {"num_classes": 1000}, sha, 1000, now, ("as-is",)))
            store.put_link(Link("default", sha, "1.0.31", "%s-l" % sha[:16], None, now))
        for j in range(n // 10):  # 1,000 names of 10 versions each
            store.put_versions("m%d" % j, [Version("m%d" % j, v + 1, "%064x" % (j * 10 + v), now - (j * 10 + v), "/inbox") for v in range(10)])
        built = time.perf_counter() - start
        env = dict(os.environ, CACHECTL_ROOT=str(store.root))
        # the default environment is registered on first use; do it outside the timing
        subprocess.run([str(BIN / "cachectl"), "env", "list"], env=env, check=True, stdout=subprocess.DEVNULL)
        start = time.perf_counter()
        subprocess.run([str(BIN / "cachectl"), "list", "--json"], env=env, check=True, stdout=subprocess.DEVNULL)
        listed = time.perf_counter() - start
        start = time.perf_counter()
        plan(store, Policy(keep_last=3))
        planned = time.perf_counter() - start
    return built, listed, planned


def _mb(n: int) -> str:
    return "%.0f MB" % (n / 1e6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the two smaller models")
    args = parser.parse_args(argv)
    models = QUICK if args.quick else MODELS
    print("making checkpoints and timing (this takes a few minutes)...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=CACHE.parent if CACHE.parent.exists() else None) as tmp:
        rows = bench_conversions(models, Path(tmp))
        inconv = bench_convert_in_process(models, Path(tmp))
    inproc = bench_inspect_in_process(models)
    built, listed, planned = bench_store()
    from benchmarks.daemon import run as bench_daemon

    daemon = bench_daemon()
    big = make("vit_large_patch16_224")[0]  # the ~1 GB case
    from benchmarks.daemon import close_to_ready

    big_ready = close_to_ready(big)

    print("\n## 1-2. conversion time against cp and against the by-hand path")
    print("| model | input | size | cp s | convert s | by hand s | convert/cp (target <= 1.3) | convert/by hand (target <= 0.3) |")
    print("|---|---|---|---|---|---|---|---|")
    for model, label, suffix, size, largest, cp, conv, hand, insp in rows:
        print("| %s | %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f |" % (
            model, suffix, _mb(size), cp.seconds, conv.seconds, hand.seconds, conv.seconds / cp.seconds, conv.seconds / hand.seconds))
    print("\n## 1, 3. conversion in a warm process (as the daemon runs it): time and added memory")
    print("| model | input | size | cp s | cp+fsync s | convert s | convert/cp (target <= 1.3) | convert/(cp+fsync) | anon memory added | added / largest tensor | added / file size |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model, suffix, size, largest, cp, cp_sync, conv, added, base in inconv:
        print("| %s | %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %s | %.2f | %.3f |" % (
            model, suffix, _mb(size), cp, cp_sync, conv, conv / cp, conv / cp_sync, _mb(added), added / largest, added / size))
    print("fixed overhead of the warm process (torch, timm, catalog, target model): %s anonymous" % _mb(inconv[0][-1]))
    print("\n## 3. peak memory of a conversion (RSS of the cachectl process)")
    print("| model | input | size | largest tensor | peak RSS | RSS / largest tensor | RSS / file size | by hand peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for model, label, suffix, size, largest, cp, conv, hand, insp in rows:
        print("| %s | %s | %s | %s | %s | %.1f | %.2f | %s |" % (
            model, suffix, _mb(size), _mb(largest), _mb(conv.peak_rss), conv.peak_rss / largest, conv.peak_rss / size, _mb(hand.peak_rss)))
    print("\n## 4. inspect time per file size (target: flat)")
    print("| model | input | size | `cachectl inspect` s (with interpreter start) | read + identify ms (in process) |")
    print("|---|---|---|---|---|")
    for (model, label, suffix, size, largest, cp, conv, hand, insp), (_, _, _, secs) in zip(rows, inproc):
        print("| %s | %s | %s | %.2f | %.1f |" % (model, suffix, _mb(size), insp.seconds, secs * 1000))
    print("\n## 5. the daemon (200 mobilenetv3_small_050 checkpoints, 6 MB each, renamed in at once)")
    print("| measure | value |")
    print("|---|---|")
    print("| files per second, 1 worker | %.1f |" % daemon["files_per_s_1_workers"])
    print("| files per second, 2 workers | %.1f |" % daemon["files_per_s_2_workers"])
    print("| 2 workers / 1 worker | %.2f |" % (daemon["files_per_s_2_workers"] / daemon["files_per_s_1_workers"]))
    print("| close to ready, idle daemon, 6 MB file (median of 5) | %.0f ms |" % (daemon["close_to_ready_s"] * 1000))
    print("| close to ready, idle daemon, %s (%s) | %.1f s |" % (big.name, _mb(big.stat().st_size), big_ready))
    print("\n## 6. a store of 10,000 entries")
    print("| step | seconds |")
    print("|---|---|")
    print("| build the store (10,000 sources, converted files and links; 1,000 names) | %.1f |" % built)
    print("| `cachectl list --json` (with interpreter start) | %.2f |" % listed)
    print("| prune plan, --keep-last 3 | %.2f |" % planned)
    return 0


if __name__ == "__main__":
    sys.exit(main())
