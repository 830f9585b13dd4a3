"""The wide cross-version matrix: every model below, made by each release, converted for
every other release, loaded strictly and run there; writes docs/compat-matrix.md.

    python -m tools.matrix [--releases 0.4.12,0.6.13,0.9.16,1.0.31] [--models a,b]

A case counts as equal when the target's outputs match the producing release's within
tools.crossversion.ATOL. Models that a release does not have are skipped for it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from cachectl.catalog import Catalog, version_key
from cachectl.convert import convert
from cachectl.errors import CachectlError
from cachectl.target import Target
from tools.crossversion import ATOL, INSTALLED, make_checkpoint, python_for, run_in
from tools.timm_releases import ROOT

# One small model per family whose layout changed between catalogued releases, then
# families that did not change, as controls.
CHANGED = [
    "swin_tiny_patch4_window7_224", "levit_128s", "swinv2_tiny_window8_256", "swinv2_cr_tiny_224",
    # tresnet_m is proven in tests/test_family_tresnet.py only: timm 0.6.13 needs the
    # compiled inplace_abn package to run it at all
    "pit_ti_224", "sequencer2d_s", "poolformer_s12", "coatnet_0_224", "convnext_tiny_hnf",
    "vit_tiny_patch16_224", "beit_base_patch16_224", "tnt_s_patch16_224",
]
CONTROLS = ["resnet18", "efficientnet_b0", "mobilenetv3_small_050", "densenet121", "regnetx_002"]
# Look-alikes: each shares its layout with a model that computes differently (TensorFlow
# padding; a distillation head that changed what it reads), so only the file's name tells
# them apart. Renamed: known by a deprecated name in later releases (an arch.tag there).
LOOK_ALIKES = ["tf_efficientnet_b0_ap", "pit_ti_distilled_224", "deit_tiny_distilled_patch16_224"]
RENAMED = ["vit_tiny_patch16_224_in21k", "resnetv2_50x1_bitm"]
RELEASES = ["0.4.12", "0.6.13", "0.9.16", "1.0.31"]
LATEST = "1.0.31"  # the release installed beside cachectl: its target runs in-process


def _kind(steps: tuple[str, ...]) -> str:
    if any(s.startswith("migration") for s in steps):
        return "migration"
    if any("filter" in s for s in steps):
        return "timm filter"
    return "as-is"


def run(releases: list[str], models: list[str]) -> list[dict]:
    catalog = Catalog.load()
    # a release has a model it knows by name or through its deprecation table
    have = {r: set(catalog.models(r)) | set(catalog.deprecated(r)) for r in releases}
    targets = {r: Target(None if r == LATEST else python_for(r)) for r in releases}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for src in releases:
                if model not in have[src]:
                    continue
                for dst in releases:
                    if dst == src or model not in have[dst]:
                        continue
                    rows.append(_case(model, src, dst, targets[dst], Path(tmp)))
                    r = rows[-1]
                    print("%-30s %-7s -> %-7s %-10s %s" % (model, src, dst, r["result"], r["detail"][:90]), flush=True)
    for t in targets.values():
        t.close()
    return rows


def _case(model: str, src: str, dst: str, target: Target, tmp: Path) -> dict:
    try:
        return _convert_and_run(model, src, dst, target, tmp)
    except AssertionError as exc:  # the release itself failed to make or run the model
        return {"model": model, "src": src, "dst": dst, "result": "error", "detail": str(exc).splitlines()[0]}


def _convert_and_run(model: str, src: str, dst: str, target: Target, tmp: Path) -> dict:
    made = make_checkpoint(INSTALLED if src == LATEST else src, model)
    out = tmp / ("%s-%s-%s.safetensors" % (model, src, dst))
    start = time.perf_counter()
    try:
        result = convert(made.path, out, target)
    except CachectlError as exc:
        return {"model": model, "src": src, "dst": dst, "result": "no plan", "detail": str(exc).split(": ", 1)[-1]}
    seconds = time.perf_counter() - start
    got = run_in(INSTALLED if dst == LATEST else dst, {"name": result.model.name, "kwargs": dict(result.model.kwargs)}, out, tmp)
    diff = (got - made.logits).abs().max().item()
    equal = diff <= ATOL
    return {"model": model, "src": src, "dst": dst, "result": "equal" if equal else "DIFFERENT",
            "detail": "%s, max diff %.1e, %.1f s" % (_kind(result.steps), diff, seconds)}


def _earlier_rows(text: str) -> list[dict]:
    """The cases an earlier run wrote in the doc's table of every case."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith("## Every case"):
            inside = True
        elif inside and line.startswith("| ") and not line.startswith("| model "):
            model, src, dst, result, detail = [c.strip() for c in line.strip("|").split(" | ", 4)]
            rows.append({"model": model, "src": src, "dst": dst, "result": result, "detail": detail})
        elif inside and line.startswith("<!--"):
            break
    return rows


def write(rows: list[dict], releases: list[str]) -> Path:
    """The doc's matrix and table of every case: this run's cases, beside those of earlier
    runs it did not repeat (a run of some models keeps the others); the sections other
    tools write (from tools/fingerprint_report.py's marker on) are kept as they are."""
    from tools.fingerprint_report import START

    path = ROOT / "docs" / "compat-matrix.md"
    old = path.read_text() if path.exists() else ""
    ran = {(r["model"], r["src"], r["dst"]) for r in rows}
    rows = [r for r in _earlier_rows(old) if (r["model"], r["src"], r["dst"]) not in ran] + rows
    releases = sorted(set(releases) | {r["src"] for r in rows} | {r["dst"] for r in rows}, key=version_key)
    totals = defaultdict(lambda: [0, 0])
    for r in rows:
        t = totals[(r["src"], r["dst"])]
        t[0] += r["result"] == "equal"
        t[1] += 1
    lines = ["# Cross-version compatibility matrix", "",
             "Made by `python -m tools.matrix` (`make matrix`): each model is made with random weights by",
             "the source release, converted by cachectl for the target release, loaded there with",
             "`strict=True` and run on a fixed input. A cell is cases with outputs equal to the source",
             "release's (max abs diff <= %g) / cases where both releases have the model." % ATOL, "",
             "| source \\ target | " + " | ".join(releases) + " |", "|---" * (len(releases) + 1) + "|"]
    for src in releases:
        cells = []
        for dst in releases:
            eq, n = totals.get((src, dst), [0, 0])
            cells.append("-" if src == dst else "%d/%d" % (eq, n))
        lines.append("| %s | %s |" % (src, " | ".join(cells)))
    counts = defaultdict(int)
    for r in rows:
        counts[r["result"]] += 1
    lines += ["", "Of %d cases: %d equal, %d refused with a reason (no plan), %d converted with "
              "different outputs, %d that a release could not make or run." % (
                  len(rows), counts["equal"], counts["no plan"], counts["DIFFERENT"], counts["error"])]
    lines += ["", "## Every case", "", "| model | source | target | result | how, max diff, convert time |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append("| %s | %s | %s | %s | %s |" % (r["model"], r["src"], r["dst"], r["result"], r["detail"].replace("|", "/")))
    path.parent.mkdir(exist_ok=True)
    tail = ["", START + old.split(START, 1)[1].rstrip("\n")] if START in old else []
    path.write_text("\n".join(lines + tail) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--releases", default=",".join(RELEASES))
    parser.add_argument("--models", default=",".join(CHANGED + CONTROLS + LOOK_ALIKES + RENAMED))
    args = parser.parse_args(argv)
    releases = sorted(args.releases.split(","), key=version_key)
    rows = run(releases, args.models.split(","))
    path = write(rows, releases)
    bad = [r for r in rows if r["result"] != "equal"]
    print("wrote %s: %d cases, %d equal" % (path, len(rows), len(rows) - len(bad)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
