"""Build the math fingerprints shipped beside the catalog (cachectl/data/catalog/fingerprints-v2.json.gz).

    cachectl catalog build                        # every catalogued release not done yet, 2 at a time
    cachectl catalog build 0.9.2 --jobs 1         # (with a release already catalogued: its fingerprints)

Each release runs cachectl/_fingerprint_dump.py at `nice -n 19` on one thread, on pinned CPU
kernels (cachectl/numerics.py; a machine that cannot reproduce the shipped fingerprints is
refused first), resumable: a model the process dies in is tried once more, then skipped and
said to have crashed. Releases whose dump finished are merged into the shipped file as each
finishes, beside the releases it already holds, so a long build can be committed release by
release; `--first-only` fingerprints only the models the tests and the hand-written
math-change tables name, and ships the release as partial. What a fingerprint is:
cachectl/_fingerprint.py.
"""
from __future__ import annotations

import concurrent.futures
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from . import numerics
from .catalog import CATALOG_DIR, FINGERPRINTS_VERSION, fingerprints_path, version_key
from .errors import CachectlError
from .releases import BOOT, env_for, script, work_dir

_write_lock = threading.Lock()


# Models fingerprinted first in every release: those the cases and the tests name.
FIRST = ("resnet18", "resnet50", "efficientnet_b0", "tf_efficientnet_b0", "tf_efficientnet_b0_ap",
         "swinv2_tiny_window8_256", "swinv2_tiny_window16_256", "resnetv2_50x1_bitm", "resnetv2_50x1_bit",
         "vit_base_patch16_224_in21k", "vit_base_patch16_224", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
         "levit_128s", "pit_ti_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224")


# Models whose outputs move with the CPU's kernels by more than FINGERPRINT_RTOL unless the
# kernels are pinned (cachectl/numerics.py), and resnet18, which barely moves
SENTINELS = ("resnet18", "visformer_tiny", "repvit_m1", "efficientvit_m0", "resnest200e")


def check_machine(say: Callable[[str], None] = print) -> None:
    """CachectlError unless this machine reproduces the shipped fingerprints of the timm
    installed beside cachectl: fingerprints it took could not be compared with the others."""
    import tempfile

    import timm

    from .catalog import Catalog, Fingerprint, same_math

    release, catalog = timm.__version__, Catalog.load()
    shipped = {n: catalog.fingerprint(release, n) for n in SENTINELS}
    shipped = {n: f for n, f in shipped.items() if f is not None}
    if not shipped:
        say("timm %s (beside cachectl) has no shipped fingerprints: this machine's kernels are not checked" % release)
        return
    with tempfile.TemporaryDirectory(prefix="cachectl-fp-check-") as tmp:
        first, out = Path(tmp) / "first.txt", Path(tmp) / "out.jsonl"
        first.write_text("\n".join(shipped) + "\n")
        subprocess.run([sys.executable, "-c", BOOT, script("_fingerprint_dump.py"), str(out), str(first), "--first-only"],
                       env=numerics.pinned(dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")), cwd="/",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        got = {r["model"]: r["fingerprint"] for r in map(json.loads, out.read_text().splitlines()) if "fingerprint" in r}
    off = []
    for name, fp in shipped.items():
        if name not in got or same_math(fp, Fingerprint.taken(release, name, got[name])) is not True:
            off.append(name)
    if off:
        raise CachectlError(None, "this machine computes %s of timm %s otherwise than the machine that made the shipped "
                                  "fingerprints, even with its kernels pinned to AVX2: fingerprints taken here would read "
                                  "as math changes" % (", ".join(off), release),
                            "Build the fingerprints on an x86-64 machine with AVX2, as the shipped ones were.")
    say("this machine reproduces the shipped fingerprints of timm %s (%s)" % (release, ", ".join(shipped)))


def dumps_dir() -> Path:
    return work_dir() / "fingerprints"


def first_names() -> list[str]:
    """FIRST and every model a hand-written math change names, in any catalogued release."""
    from . import migrations
    from .catalog import Catalog

    catalog = Catalog.load()
    names = set(FIRST)
    for release in catalog.releases:
        for name, entry in catalog.models(release).items():
            if migrations.math_changes(entry.family, name):
                names.add(name)
    return sorted(names)


def dump(version: str, first_only: bool = False, say: Callable[[str], None] = print) -> Path:
    out = dumps_dir() / ("%s.jsonl" % version)
    out.parent.mkdir(parents=True, exist_ok=True)
    first = dumps_dir() / "first.txt"
    first.write_text("\n".join(first_names()) + "\n")
    env = numerics.pinned(dict(env_for(version), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    for attempt in range(50):
        if _finished(out):
            return out
        say("timm %s: fingerprinting every model (%s, attempt %d)" % (version, out, attempt + 1))
        proc = subprocess.run(["nice", "-n", "19", sys.executable, "-c", BOOT, script("_fingerprint_dump.py"), str(out),
                               str(first)] + (["--first-only"] if first_only else []),
                              env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if proc.returncode == 0:
            return out
    raise CachectlError(out, "timm %s: the fingerprint dump keeps crashing" % version,
                        "Read the last lines of this file for the model it stops at.")


def _finished(path: Path) -> bool:
    if not path.exists():
        return False
    with open(path) as f:
        return any('"__done__"' in line for line in f)


def _g(x: float) -> float:
    return float("%.9g" % x)


def release_record(path: Path) -> dict:
    """One release's entry of the shipped file, from its finished dump."""
    models, skipped, failed, done, methods = {}, {}, {}, {}, set()
    cpu = wall = 0.0
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec["model"] == "__done__":
                done = rec
                continue
            if rec.get("started"):
                continue
            cpu += rec.get("cpu", 0.0)
            wall += rec.get("wall", 0.0)
            name = rec["model"]
            if "fingerprint" in rec:
                fp = rec["fingerprint"]
                methods.add(fp["method"])
                models[name] = json.dumps([fp["weights"], fp["input"], fp["shape"], _g(fp["sum"]), _g(fp["abs"]),
                                           [_g(v) for v in fp["values"]]], separators=(",", ":"))
            elif "skipped" in rec:
                skipped[name] = rec["skipped"]
            else:
                failed[name] = rec["error"]
    if len(methods) > 1:
        raise CachectlError(path, "mixes fingerprint methods %s" % sorted(methods), "Delete it and build again.")
    return {
        # an unfinished dump ships as it is: the models it has not reached have no fingerprint yet
        "complete": bool(done), "timm": done.get("timm"), "torch": done.get("torch"), "method": max(methods) if methods else done.get("method"),
        "models": dict(sorted(models.items())), "skipped": dict(sorted(skipped.items())),
        "failed": dict(sorted(failed.items())), "cpu_seconds": round(cpu, 1), "wall_seconds": round(wall, 1),
    }


def load_shipped() -> dict:
    try:
        with gzip.open(fingerprints_path(), "rt") as f:
            return json.load(f)
    except FileNotFoundError:
        return {"format": "cachectl-fingerprints", "version": FINGERPRINTS_VERSION, "releases": {}}


def merge_into_shipped() -> dict:
    """Put every dump there is, finished or not, into the shipped file (atomically), beside
    the releases it holds without a dump here; the new content."""
    with _write_lock:
        data = load_shipped()
        for path in sorted(dumps_dir().glob("*.jsonl")):
            data["releases"][path.stem] = release_record(path)
        data["releases"] = dict(sorted(data["releases"].items(), key=lambda kv: version_key(kv[0])))
        CATALOG_DIR.mkdir(parents=True, exist_ok=True)
        target = fingerprints_path()
        tmp = target.with_name("." + target.name + ".tmp")
        with gzip.open(tmp, "wt", compresslevel=9) as f:
            json.dump(data, f, separators=(",", ":"))
        tmp.replace(target)
        return data


def summary(version: str, rel: dict) -> str:
    return "timm %s%s: %d fingerprinted, %d skipped (budget), %d failed; %.0f CPU s, %.0f s wall" % (
        version, "" if rel["complete"] else " (partial)", len(rel["models"]), len(rel["skipped"]), len(rel["failed"]), rel["cpu_seconds"], rel["wall_seconds"])


def build(versions: list[str], *, jobs: int = 2, first_only: bool = False, say: Callable[[str], None] = print) -> None:
    """Fingerprint `versions`, `jobs` at a time, each shipped as soon as its dump is done."""
    started = time.time()
    if versions:
        check_machine(say)

    def one(version: str) -> None:
        t0 = time.time()
        dump(version, first_only, say)
        data = merge_into_shipped()
        say("%s (this run %.0f s); wrote %s, %.2f MB" % (
            summary(version, data["releases"][version]), time.time() - t0, fingerprints_path(),
            os.path.getsize(fingerprints_path()) / 1e6))

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        for f in [pool.submit(one, v) for v in versions]:
            f.result()
    if versions:
        say("fingerprints done in %.0f s" % (time.time() - started))
