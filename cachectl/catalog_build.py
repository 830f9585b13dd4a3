"""Build the layout catalog (cachectl/data/catalog/) from real timm releases: `cachectl catalog build`.

    cachectl catalog build 1.0.32      # add a release: one command
    cachectl catalog build             # finish what the catalog's releases lack (fingerprints)

Each new release is installed beside the others (cachectl/releases.py), every registered
model is built without real weights in an interpreter importing that release, and its state
dict layout recorded (resumable: a run stopped or crashed goes on where it was; a model that
crashes the process is skipped). The release is then merged into the shipped catalog, each
distinct layout stored once: the index (releases, models, ids: what identification reads)
and the layouts (keys and shapes, read only for partial matches and diffs); the index
keeps each release as its changes from the one before (catalog.compact). Then its math
fingerprints are taken (cachectl/fingerprint_build.py).
"""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

from .catalog import CATALOG_DIR, FORMAT_VERSION, compact, expand, index_path, layouts_path, version_key
from .errors import CachectlError
from .layout import is_under, layout_id
from .releases import BOOT, env_for, script, work_dir


def dumps_dir() -> Path:
    return work_dir() / "catalog"


def dump(version: str, say: Callable[[str], None] = print) -> Path:
    """The finished dump of `version`'s registry, made (or resumed) first if needed."""
    out = dumps_dir() / ("%s.jsonl" % version)
    out.parent.mkdir(parents=True, exist_ok=True)
    return record(out, sys.executable, env_for(version), version, say)


def record(out: Path, python: str, env: dict[str, str] | None, version: str, say: Callable[[str], None]) -> Path:
    """`out`, the finished dump of the timm that `python` imports (with `env`), made or
    resumed: a model that crashes the interpreter is skipped on the next attempt."""
    for attempt in range(20):
        if _finished(out):
            return out
        say("timm %s: recording every model's layout (%s, attempt %d)" % (version, out, attempt + 1))
        subprocess.run([python, "-c", BOOT, script("_catalog_dump.py"), str(out)],
                       env=env, cwd="/", stderr=subprocess.DEVNULL)
        if not out.exists():  # stopped before its first model: is it timm itself?
            _check_imports(python, env, version, out)
    raise CachectlError(out, "timm %s: the layout dump keeps crashing" % version,
                        "Read the last lines of this file for the model it stops at.")


def _check_imports(python: str, env: dict[str, str] | None, version: str, out: Path) -> None:
    # timm 0.6.11 and 0.6.12 declare dataclass fields that Python 3.11 refuses
    run = subprocess.run([python, "-c", "import timm"], env=env, cwd="/", stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, errors="replace")
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["exit status %d" % run.returncode])[-1]
        raise CachectlError(out, "timm %s does not import in %s (%s)" % (version, python, last),
                            "Catalogue it with a Python that imports it, or leave it out.")


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


def shipped() -> tuple[dict, list]:
    """(index, layouts) of the catalog in the package; empty ones when there is none yet."""
    try:
        with gzip.open(index_path(), "rt") as f:
            index = expand(json.load(f), index_path())
        with gzip.open(layouts_path(), "rt") as f:
            layouts = json.load(f)
    except FileNotFoundError:
        return {"format": "cachectl-catalog", "version": FORMAT_VERSION, "releases": {}, "layout_ids": [],
                "classifier_specs": [], "bodies": []}, []
    return index, layouts


def merge(index: dict, layouts: list, dumps: dict[str, Path]) -> tuple[dict, list]:
    """(index, layouts) with each release of `dumps` added (or replaced), each distinct layout stored once."""
    layouts = list(layouts)
    by_id = {lid: i for i, lid in enumerate(index["layout_ids"])}
    specs = {tuple(s): i for i, s in enumerate(index["classifier_specs"])}
    bodies = {(li, si): bid for li, si, bid in index["bodies"]}
    releases = dict(index["releases"])
    for version in sorted(dumps, key=version_key):
        models, tables = _records(dumps[version])
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
    index = {
        "format": "cachectl-catalog", "version": FORMAT_VERSION,
        "releases": dict(sorted(releases.items(), key=lambda kv: version_key(kv[0]))),
        "layout_ids": sorted(by_id, key=by_id.get), "classifier_specs": [list(s) for s in sorted(specs, key=specs.get)],
        "bodies": [[li, si, bid] for (li, si), bid in sorted(bodies.items())],
    }
    return index, layouts


def write(index: dict, layouts: list) -> str:
    """Write the catalog into the package, each file atomically; what was written."""
    try:
        CATALOG_DIR.mkdir(parents=True, exist_ok=True)
        total = 0
        for path, value in ((index_path(), compact(index)), (layouts_path(), layouts)):
            tmp = path.with_name("." + path.name + ".tmp")
            with gzip.open(tmp, "wt", compresslevel=9) as f:
                json.dump(value, f, separators=(",", ":"))
            tmp.replace(path)
            total += path.stat().st_size
    except PermissionError as exc:
        raise CachectlError(exc.filename, "cannot write the catalog (%s)" % exc.strerror,
                            "Run this as the user who installed cachectl, in its environment.")
    return "wrote %s: %d releases, %d layouts, %.2f MB" % (CATALOG_DIR, len(index["releases"]), len(layouts), total / 1e6)


def build(versions: list[str], *, fingerprints: bool = True, jobs: int = 2, first_only: bool = False,
          say: Callable[[str], None] = print) -> None:
    """Add `versions` to the catalog (resuming a stopped build), then fingerprint every
    catalogued release whose fingerprints are not complete."""
    index, layouts = shipped()
    new = [v for v in versions if v not in index["releases"]]
    if new:
        dumps = {v: dump(v, say) for v in new}
        say(write(*merge(index, layouts, dumps)))
    for v in versions:
        if v not in new:
            say("timm %s: already in the catalog" % v)
    if fingerprints:
        from . import fingerprint_build

        done = fingerprint_build.load_shipped()["releases"]
        todo = [v for v in sorted(set(index["releases"]) | set(new), key=version_key) if not done.get(v, {}).get("complete")]
        fingerprint_build.build(todo, jobs=jobs, first_only=first_only, say=say)
