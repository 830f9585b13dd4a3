"""Write the math-fingerprint tables of docs/compat-matrix.md from the shipped catalog.

    python -m tools.fingerprint_report            # rewrite the fingerprint section of docs/compat-matrix.md
    python -m tools.fingerprint_report --print    # print it instead

The section sits between two markers, so tools/matrix.py (which writes the rest of the
file) keeps it, and this tool leaves the rest alone.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from cachectl.catalog import FINGERPRINT_RTOL, Catalog, fingerprints_path, same_math
from tools.timm_releases import ROOT

DOC = ROOT / "docs" / "compat-matrix.md"
START = "<!-- fingerprints:start (python -m tools.fingerprint_report) -->"
END = "<!-- fingerprints:end -->"


def _newer_name(catalog: Catalog, newer: str, name: str) -> str | None:
    models = catalog.models(newer)
    if name in models:
        return name
    renamed = catalog.deprecated(newer).get(name, "").split(".")[0]
    return renamed if renamed in models else None


def compare_pair(catalog: Catalog, older: str, newer: str) -> dict:
    """Every model of `older` (following renames into `newer`), sorted by what its fingerprints say."""
    out = {"both": 0, "same": [], "different": defaultdict(list), "other_tensors": [], "unfingerprinted": []}
    for name in sorted(catalog.models(older)):
        new_name = _newer_name(catalog, newer, name)
        if new_name is None:
            continue
        out["both"] += 1
        a, b = catalog.fingerprint(older, name), catalog.fingerprint(newer, new_name)
        verdict = same_math(a, b)
        if a is None or b is None:
            out["unfingerprinted"].append(name)
        elif verdict is None:
            out["other_tensors"].append(name)
        elif verdict:
            out["same"].append(name)
        else:
            label = name if new_name == name else "%s (%s)" % (name, new_name)
            out["different"][catalog.models(newer)[new_name].family].append(label)
    return out


def look_alikes(catalog: Catalog, release: str) -> tuple[int, list[list[str]]]:
    """(layouts shared by several fingerprinted models, [[names computing differently], ...])."""
    by_layout: dict[tuple, list[str]] = defaultdict(list)
    for name in catalog.models(release):
        fp = catalog.fingerprint(release, name)
        if fp is not None:  # comparable: the same tensors (so the same layout) and the same input size
            by_layout[(fp.weights, fp.input)].append(name)
    shared, differing = 0, []
    for names in by_layout.values():
        if len(names) < 2:
            continue
        shared += 1
        groups: list[list[str]] = []
        for name in sorted(names):
            fp = catalog.fingerprint(release, name)
            for g in groups:
                if same_math(catalog.fingerprint(release, g[0]), fp):
                    g.append(name)
                    break
            else:
                groups.append([name])
        if len(groups) > 1:
            differing.append([" = ".join(g) for g in groups])
    return shared, differing


def split_layouts(catalog: Catalog) -> list[tuple[str, list[list[str]]]]:
    """(model, release groups) where one model's one layout computes differently across releases:
    a file of that layout does not say which math it was trained with."""
    spans: dict[tuple, list[str]] = defaultdict(list)
    for release in catalog.fingerprinted_releases:
        for name, entry in catalog.models(release).items():
            fp = catalog.fingerprint(release, name)
            if fp is not None:
                spans[(name, entry.layout_index, fp.weights, fp.input)].append(release)
    out = []
    for (name, *_), releases in sorted(spans.items()):
        groups: list[list[str]] = []
        for r in releases:
            fp = catalog.fingerprint(r, name)
            for g in groups:
                if same_math(catalog.fingerprint(g[0], name), fp):
                    g.append(r)
                    break
            else:
                groups.append([r])
        if len(groups) > 1:
            out.append((name, groups))
    return out


def every_pair(catalog: Catalog, done: tuple[str, ...]) -> list[str]:
    """Every pair of fingerprinted releases (either way: same math is symmetric): of the models
    both fingerprinted with the same tensors, how many compute the same (a file converts as it
    is, proven) and how many differently (refused); beside them the models whose tensors differ
    (converted by a migration, proven by running for neighbouring releases below)."""
    lines = ["", "### Every pair of fingerprinted releases", "",
             "Each cell, for the models both releases fingerprinted with the same tensors: same math / compared,",
             "then the models of other tensors (a migration; neighbouring pairs are proven by running in the next",
             "section). Same math is a conversion as it is, proven; different math is refused.", "",
             "| older \\ newer | " + " | ".join(done[1:]) + " |", "|---" * len(done) + "|"]
    for i, older in enumerate(done[:-1]):
        cells = []
        for j, newer in enumerate(done[1:], start=1):
            if j <= i:
                cells.append("")
                continue
            c = compare_pair(catalog, older, newer)
            ndiff = sum(len(v) for v in c["different"].values())
            cells.append("%d/%d, %d other" % (len(c["same"]), len(c["same"]) + ndiff, len(c["other_tensors"])))
        lines.append("| %s | %s |" % (older, " | ".join(cells)))
    return lines


def report(catalog: Catalog) -> list[str]:
    fps = catalog._fingerprints()
    done = catalog.fingerprinted_releases
    lines = [
        START, "",
        "## Math fingerprints across releases", "",
        "Every catalogued model is built in each fingerprinted release with deterministic weights made from",
        "each tensor's key and shape, run once on a fixed input (`cachectl/_fingerprint.py`) on CPU kernels",
        "pinned to AVX2 (`cachectl/numerics.py`: AVX-512 ones moved a few models farther than the tolerance), and its output",
        "kept (`%s`). Two entries with the same tensors compute the same when their outputs agree to" % fingerprints_path().name,
        "%g relative; cachectl refuses to convert between entries that do not. Consecutive fingerprinted" % FINGERPRINT_RTOL,
        "releases, following renames (\"not fingerprinted\": over the budget, or not reached yet in a release",
        "the last table marks partial):", "",
        "| releases | models in both | compared | same math | different math | other tensors (migrations) | not fingerprinted |",
        "|---|---|---|---|---|---|---|",
    ]
    details = []
    for older, newer in zip(done, done[1:]):
        c = compare_pair(catalog, older, newer)
        ndiff = sum(len(v) for v in c["different"].values())
        lines.append("| %s -> %s | %d | %d | %d | %d | %d | %d |" % (
            older, newer, c["both"], len(c["same"]) + ndiff, len(c["same"]), ndiff, len(c["other_tensors"]),
            len(c["unfingerprinted"])))
        for family, models in sorted(c["different"].items()):
            details.append("| %s -> %s | %s | %d | %s |" % (older, newer, family, len(models), ", ".join(models)))
    lines += ["", "Different math, by family:", ""]
    if details:
        lines += ["| releases | family | models | which |", "|---|---|---|---|"] + details
    else:
        lines.append("None.")
    lines += every_pair(catalog, done)
    layout_only = [r for r in catalog.releases if r not in done]
    if layout_only:
        lines += ["", "Catalogued by their layouts only, without fingerprints yet (their files are tagged; a conversion",
                  "names them as unverified): timm %s." % ", ".join(layout_only)]
    split = split_layouts(catalog)
    lines += ["", "### One layout, several maths",
              "",
              "A file of these layouts does not tell which math it was trained with: cachectl converts it only",
              "for a release that computes like every release making the layout, and otherwise refuses",
              "and says which releases fit which maker. %d models:" % len(split), ""]
    if split:
        lines += ["| model | releases that compute alike |", "|---|---|"]
        lines += ["| %s | %s |" % (name, " / ".join(", ".join(g) for g in groups)) for name, groups in split]
    lines += ["", "### Look-alikes: one layout, several models, different math", "",
              "Models of one release with the same tensors, run on the same input size, grouped by what they compute.", "",
              "| release | layouts shared by several models | of which compute differently | examples |", "|---|---|---|---|"]
    for release in done:
        shared, differing = look_alikes(catalog, release)
        examples = "; ".join(" vs ".join(g) for g in differing[:3]) + (" ..." if len(differing) > 3 else "")
        lines.append("| %s | %d | %d | %s |" % (release, shared, len(differing), examples))
    lines += ["", "### What the fingerprints cost", "",
              "One thread at `nice -n 19`, torch %s; a model above %s is recorded as not fingerprinted, with the reason." % (
                  next((fps[r]["torch"] for r in done if fps[r].get("torch")), "?"), "the parameter or CPU-time budget"), "",
              "| release | models | done | fingerprinted | over budget | failed | CPU seconds |", "|---|---|---|---|---|---|---|"]
    total = 0.0
    for release in done:
        rel = fps[release]
        n = len(rel["models"]) + len(rel["skipped"]) + len(rel["failed"])
        total += rel["cpu_seconds"]
        lines.append("| %s | %d | %s | %d | %d | %d | %.0f |" % (
            release, len(catalog.models(release)), "all" if rel.get("complete") else "%d (partial)" % n,
            len(rel["models"]), len(rel["skipped"]), len(rel["failed"]), rel["cpu_seconds"]))
    lines += ["", "Total %.0f CPU seconds; %s is %.2f MB." % (total, fingerprints_path().name, fingerprints_path().stat().st_size / 1e6)
              if done else "", END]
    return lines


def write(lines: list[str]) -> None:
    text = DOC.read_text() if DOC.exists() else "# Cross-version compatibility matrix\n"
    section = "\n".join(lines)
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args(argv)
    lines = report(Catalog.load())
    if args.print:
        print("\n".join(lines))
    else:
        write(lines)
        print("wrote the fingerprint section of %s" % DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
