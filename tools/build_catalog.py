"""Build the layout catalog shipped in cachectl/data/catalog/ from real timm releases.

    python -m tools.build_catalog                 # the releases already in the catalog
    python -m tools.build_catalog 1.0.32          # add a release: one command

Each release is installed beside the others (tools/timm_releases.py), every registered
model is built without real weights and its state dict layout recorded (resumable: a
crash skips the model it happened in), then all releases are merged so each distinct
layout is stored once. Two files: the index (releases, models, ids: what identification
reads) and the layouts (keys and shapes, read only for partial matches and diffs).
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

from cachectl.catalog import CATALOG_DIR, FORMAT_VERSION, Catalog, index_path, layouts_path, version_key
from cachectl.layout import is_under, layout_id
from tools.timm_releases import CATALOG_RELEASES, ROOT, release_env

DUMPS = ROOT / "build" / "catalog"


def dump(version: str) -> Path:
    out = DUMPS / ("%s.jsonl" % version)
    out.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(20):
        if _finished(out):
            return out
        print("dumping timm %s (attempt %d)" % (version, attempt + 1), flush=True)
        subprocess.run(
            [sys.executable, str(ROOT / "tools" / "catalog_dump.py"), str(out)],
            env=release_env(version), cwd="/", stderr=subprocess.DEVNULL,
        )
    raise SystemExit("timm %s: the dump keeps crashing; see %s" % (version, out))


def _finished(path: Path) -> bool:
    if not path.exists():
        return False
    with open(path) as f:
        return any('"__tables__"' in line for line in f)


def _records(path: Path) -> tuple[dict, dict]:
    models, tables = {}, {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec["model"] == "__tables__":
                tables = rec
            elif not rec.get("started"):
                models[rec["model"]] = rec
    return models, tables


def merge(versions: list[str]) -> tuple[dict, list]:
    """(index, layouts) for `versions`, each distinct layout stored once."""
    layouts: list[list] = []
    by_id: dict[str, int] = {}
    specs: dict[tuple, int] = {}
    bodies: dict[tuple[int, int], str] = {}
    releases = {}
    for version in sorted(versions, key=version_key):
        models, tables = _records(DUMPS / ("%s.jsonl" % version))
        entries, failed, tags = {}, {}, {}
        for name, rec in sorted(models.items()):
            if rec.get("tags"):
                tags[name] = {t: [c.get("hf_hub_id"), c.get("url"), c.get("num_classes")] for t, c in rec["tags"].items()}
            if "error" in rec:
                failed[name] = rec["error"]
                continue
            lid = layout_id((k, s) for k, s, _ in rec["keys"])
            if lid not in by_id:
                by_id[lid] = len(layouts)
                layouts.append(rec["keys"])
            spec = tuple(rec["classifier"] or ())
            spec_index = specs.setdefault(spec, len(specs)) if spec else -1
            if spec and (by_id[lid], spec_index) not in bodies:
                bodies[(by_id[lid], spec_index)] = layout_id((k, s) for k, s, _ in rec["keys"] if not is_under(k, spec))
            entries[name] = [by_id[lid], rec["family"], spec_index, rec["default_num_classes"]]
        releases[version] = {"models": entries, "failed": failed, "tags": tags, "deprecated": tables.get("deprecated", {})}
    ids = sorted(by_id, key=by_id.get)
    index = {
        "format": "cachectl-catalog", "version": FORMAT_VERSION, "releases": releases,
        "layout_ids": ids, "classifier_specs": [list(s) for s in specs],
        "bodies": [[li, si, bid] for (li, si), bid in sorted(bodies.items())],
    }
    return index, layouts


def write(index: dict, layouts: list) -> None:
    CATALOG_DIR.mkdir(parents=True, exist_ok=True)
    total = 0
    for path, value in ((index_path(), index), (layouts_path(), layouts)):
        tmp = path.with_name("." + path.name + ".tmp")
        with gzip.open(tmp, "wt", compresslevel=9) as f:
            json.dump(value, f, separators=(",", ":"))
        tmp.replace(path)
        total += path.stat().st_size
    print("wrote %s: %d releases, %d layouts, %.2f MB" % (CATALOG_DIR, len(index["releases"]), len(layouts), total / 1e6))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("versions", nargs="*", help="timm releases to add to the catalog")
    args = parser.parse_args(argv)
    try:
        known = set(Catalog.load().releases)
    except FileNotFoundError:
        known = set()
    versions = sorted(known | set(CATALOG_RELEASES) | set(args.versions), key=version_key)
    for version in versions:
        dump(version)
    write(*merge(versions))
    # then what each model computes, for the releases whose fingerprints are not complete
    from tools import build_fingerprints

    shipped = build_fingerprints.load_shipped()["releases"]
    todo = [v for v in versions if not shipped.get(v, {}).get("complete")]
    return build_fingerprints.main(todo) if todo else 0


if __name__ == "__main__":
    sys.exit(main())
