"""The commands that answer at once, as a user runs them: whole process, from the command line.

    nice -n 10 python -m benchmarks.commands [--runs 5] [--entries 10000] [--only list,show]    (also part of make bench)

Prints, each the median of --runs after one warm-up run, beside two baselines measured in the same run (`python -c pass`, and
`python -c "import torch"`, what every command paid before it read headers only):
  - `cachectl inspect --json` of a ~100 MB and a ~2.5 GB checkpoint, each as .safetensors
    and as .pth, and of the ~100 MB .pth named model_best.pth (resnet50's layout is also
    resnetblur50's and resnetaa50's: with no name to go by, inspect compares their math
    fingerprints and answers ambiguous): median wall time and peak RSS (targets: 0.3 s, 100 MB);
  - `cachectl list`, `list --json`, `show`, `path`, `pins` and `status` on a store of 10,000
    entries (target for list: 0.5 s).
The checkpoints hold the exact layout (keys, shapes, dtypes) the catalog records for
resnet50 and vit_huge_patch14_224 in the installed timm, with uninitialised values: no model
is built, and inspect identifies them as those models, loading as-is. The store is
benchmarks/store_scan.py's: written with the store's own writers, without converting.
Everything is made in a temporary folder and removed. --only names the commands to time (the
baselines are always timed); without inspect, no checkpoint is made.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

BIN = Path(sys.executable).parent
# (model, what its file weighs): the layouts the checkpoints are made of
CHECKPOINTS = (("resnet50", "~100 MB"), ("vit_huge_patch14_224", "~2.5 GB"))
INSPECT_SECONDS, INSPECT_RSS, LIST_SECONDS = 0.3, 100e6, 0.5


@dataclass(frozen=True)
class Run:
    seconds: float  # median wall time, interpreter start included
    peak_rss: int  # bytes: the median of each run's own peak (wait4's rusage of that child)
    cpu: float  # median user + system CPU seconds: what a busy machine's wall time hides


def measure(cmd: list[str], runs: int, env: dict | None = None) -> Run:
    # as an installed cachectl runs: from compiled bytecode (pip compiles it at install; a run
    # with PYTHONDONTWRITEBYTECODE compiles every module every time), after one run not
    # counted that writes it and brings the files into the page cache
    env = {k: v for k, v in (env or os.environ).items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    times, peaks, cpus = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        times.append(time.perf_counter() - start)
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        if code not in (0, 3):  # status exits 3 when no daemon runs: an answer, not a failure
            raise SystemExit("%s failed (exit %d): %s" % (" ".join(cmd), code, err.decode()[-2000:]))
        peaks.append(usage.ru_maxrss * 1024)
        cpus.append(usage.ru_utime + usage.ru_stime)
    return Run(statistics.median(times), int(statistics.median(peaks)), statistics.median(cpus))


def cachectl() -> list[str]:
    script = BIN / "cachectl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cachectl.cli"]


def make_checkpoints(folder: str) -> None:
    """Each CHECKPOINTS model's catalogued layout as .safetensors and .pth, values left unset."""
    import importlib.metadata

    import torch

    from cachectl.catalog import Catalog
    from cachectl.safetensors_io import write

    catalog = Catalog.load()
    release = importlib.metadata.version("timm")
    for model, _ in CHECKPOINTS:
        layout = catalog.layout(catalog.models(release)[model].layout_index)
        # torch.empty: pages nobody writes are the kernel's zero page, so writing 2.5 GB
        # needs no 2.5 GB of memory
        state = {k: torch.empty(s.shape, dtype=getattr(torch, s.dtype)) for k, s in layout.tensors}
        st, pth = Path(folder) / ("%s.safetensors" % model), Path(folder) / ("%s.pth" % model)
        with mock.patch("os.fsync"):
            write(st, state, {})
        torch.save(state, pth)
        del state


def _mb(n: float) -> str:
    return "%.0f MB" % (n / 1e6) if n < 1e9 else "%.2f GB" % (n / 1e9)


STORE_COMMANDS = (["list"], ["list", "--json"], ["show", "m0"], ["path", "m0"], ["pins"], ["status"])


def run(runs: int = 5, entries: int = 10_000, only: frozenset[str] | None = None) -> list[str]:
    """The tables, as markdown lines; `only`: the commands to time (by name), else every one."""
    py = sys.executable
    lines = []
    with tempfile.TemporaryDirectory(prefix="cachectl-bench-commands-") as tmp:
        tmp = Path(tmp)
        # made by children: a child's peak RSS counts what it inherited at fork, so this
        # process stays as small as `python -c pass`
        start = time.perf_counter()
        files = []
        if only is None or "inspect" in only:
            subprocess.run([py, "-c", "import sys; from benchmarks.commands import make_checkpoints as m; m(sys.argv[1])",
                            str(tmp)], check=True)
            files = [tmp / ("%s%s" % (model, suffix)) for model, _ in CHECKPOINTS for suffix in (".safetensors", ".pth")]
            os.link(tmp / "resnet50.pth", tmp / "model_best.pth")
            files.append(tmp / "model_best.pth")
        made = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run([py, "-c", "import sys; from benchmarks.store_scan import build; build(sys.argv[1], int(sys.argv[2]))",
                        str(tmp / "root"), str(entries)], check=True)
        filled = time.perf_counter() - start
        base = measure([py, "-c", "pass"], runs)
        torch = measure([py, "-c", "import torch"], runs)
        lines += ["## commands that answer at once (median of %d runs, whole process)" % runs,
                  "checkpoints made in %.0f s; %d store entries written in %.1f s" % (made, entries, filled), "",
                  "| command | file | size | s | CPU s | peak RSS | s / `python -c pass` | s / `import torch` | target |",
                  "|---|---|---|---|---|---|---|---|---|",
                  "| `python -c pass` | | | %.3f | %.3f | %s | 1.00 | %.2f | baseline |" % (
                      base.seconds, base.cpu, _mb(base.peak_rss), base.seconds / torch.seconds),
                  "| `python -c \"import torch\"` | | | %.3f | %.3f | %s | %.1f | 1.00 | baseline |" % (
                      torch.seconds, torch.cpu, _mb(torch.peak_rss), torch.seconds / base.seconds)]
        for f in files:
            r = measure(cachectl() + ["inspect", str(f), "--json"], runs)
            ok = r.seconds < INSPECT_SECONDS and r.peak_rss < INSPECT_RSS
            lines.append("| `cachectl inspect --json` | %s | %s | %.3f | %.3f | %s | %.1f | %.2f | < %.1f s, < %s: %s |" % (
                f.name, _mb(f.stat().st_size), r.seconds, r.cpu, _mb(r.peak_rss), r.seconds / base.seconds,
                r.seconds / torch.seconds, INSPECT_SECONDS, _mb(INSPECT_RSS), "met" if ok else "MISSED"))
        env = dict(os.environ, CACHECTL_ROOT=str(tmp / "root"))
        for args in STORE_COMMANDS:
            if only is not None and args[0] not in only:
                continue
            r = measure(cachectl() + args, runs, env)
            target = ("< %.1f s: %s" % (LIST_SECONDS, "met" if r.seconds < LIST_SECONDS else "MISSED")
                      if args[0] == "list" else "")
            lines.append("| `cachectl %s` | %d entries | | %.3f | %.3f | %s | %.1f | %.2f | %s |" % (
                " ".join(args), entries, r.seconds, r.cpu, _mb(r.peak_rss), r.seconds / base.seconds,
                r.seconds / torch.seconds, target))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--only", metavar="COMMANDS", help="comma-separated: inspect, %s" % ", ".join(
        dict.fromkeys(a[0] for a in STORE_COMMANDS)))
    args = parser.parse_args(argv)
    only = frozenset(args.only.split(",")) if args.only else None
    print("\n".join(run(args.runs, args.entries, only)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
