"""Prove the migrations on the catalog's fingerprints, for every model they concern.

    python -m tools.migration_proofs              # consecutive fingerprinted releases, both directions;
                                                  # rewrites its section of docs/compat-matrix.md
    python -m tools.migration_proofs --all-pairs  # every pair of fingerprinted releases (hours)
    python -m tools.migration_proofs --print      # print the section instead

Each direction's result is kept in $CACHECTL_BUILD_DIR/migration-proofs/ with a key of the
two releases' fingerprints and cachectl's code: a run stopped midway, or run again after a
release is fingerprinted, proves only the pairs whose key changed.

For each release pair and each model whose layout differs between the two (the
fingerprint report's "other tensors"), a file is made of the older side's fingerprint
weights in its own layout (integer and derived buffers as that release builds them) and
converted by cachectl for the other side, as a user's file would be. Each ends one way:
converted with its math proven (cachectl ran the converted weights in the target and got
the source's fingerprint), converted unverified (the proof could not run; the reason is
kept), or refused (the reason is kept). Every converted file is then run once more, here,
in the target release: a file whose outputs differ from the source's fingerprint counts as
"converted, different", the one number that must stay 0.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from safetensors.torch import save_file

from cachectl import proof
from cachectl.catalog import Catalog, same_math
from cachectl.convert import prepare
from cachectl.errors import CachectlError, NoPlanError
from cachectl.releases import work_dir
from cachectl.target import Target
from tools.crossversion import python_for
from tools.fingerprint_report import DOC, _newer_name

START = "<!-- migration-proofs:start (python -m tools.migration_proofs) -->"
END = "<!-- migration-proofs:end -->"
DERIVED = proof.DERIVED_BUFFERS


def _other_tensors(catalog: Catalog, a: str, b: str) -> list[tuple[str, str]]:
    """(name in a, name in b) of the fingerprinted models whose tensors differ between a and b."""
    out = []
    for name in sorted(catalog.models(a)):
        other = _newer_name(catalog, b, name) or _older_name(catalog, b, name)
        if other is None:
            continue
        fa, fb = catalog.fingerprint(a, name), catalog.fingerprint(b, other)
        if fa is not None and fb is not None and same_math(fa, fb) is None and fa.input == fb.input:
            out.append((name, other))
    return out


def _older_name(catalog: Catalog, older: str, name: str) -> str | None:
    for old, new in catalog.deprecated(older).items():
        if new.split(".")[0] == name and old in catalog.models(older):
            return old
    return None


def prove(catalog: Catalog, targets: dict[str, Target], src: str, dst: str, name: str, dst_name: str,
          folder: Path) -> tuple[str, str]:
    """(outcome, detail) of converting `name`'s fingerprint weights from `src` to `dst`."""
    fp = catalog.fingerprint(src, name)
    layout = catalog.layout(catalog.models(src)[name].layout_index)
    why = proof.unprovable(layout, fp)
    if why:
        return "not provable", why
    src_t, dst_t = targets[src], targets[dst]
    derived = [k for k, _ in layout.tensors if k.rsplit(".", 1)[-1] in DERIVED]
    as_built = src_t.buffer_values(src_t.describe(name, {}), derived) if derived else {}
    weights = proof.source_weights(layout, as_built)
    if weights.weights != fp.weights:
        return "not provable", "tied tensors"
    path = folder / ("%s.safetensors" % name)
    save_file({k: v.contiguous() for k, v in weights.tensors.items()}, path)
    try:
        prepared = prepare(path, dst_t, catalog=catalog, model=dst_name, source_timm=src)
    except NoPlanError as exc:
        kind = "refused: computes differently" if "computes differently" in exc.problem else "refused: no plan"
        return kind, exc.problem
    except CachectlError as exc:
        return "refused: other", exc.problem
    finally:
        path.unlink()
    math = next((s for s in prepared.attempt.steps if s.startswith("math:")), "")
    spec = dst_t.describe(prepared.model.name, prepared.model.kwargs)
    ran = proof.as_fingerprint(dst_t.run_fixed(spec, prepared.attempt.state, fp.input), dst, dst_name, fp)
    if not same_math(fp, ran):
        return "converted, different", math
    if math.startswith("math: unverified"):
        return "converted, unverified", math
    return "converted, proven", "%s; %s" % (prepared.attempt.name, math)


CODE = Path(__file__).resolve().parent.parent / "cachectl"


def _code_digest() -> str:
    """cachectl's Python sources: a proof holds for the code that made it."""
    h = hashlib.sha256()
    for path in sorted(CODE.rglob("*.py")):
        h.update(str(path.relative_to(CODE)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _key(catalog: Catalog, src: str, dst: str, code: str) -> str:
    records = [catalog._fingerprints()[r]["models"] for r in (src, dst)]
    return hashlib.sha256((json.dumps(records, sort_keys=True) + code).encode()).hexdigest()


def _saved(src: str, dst: str) -> Path:
    return work_dir() / "migration-proofs" / ("%s_to_%s.json" % (src, dst))


def _load(path: Path, key: str) -> dict | None:
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if row.get("key") != key:
        return None
    return dict(row, outcomes=Counter(row["outcomes"]))


def _save(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(path)


def run(pairs: list[tuple[str, str]]) -> list[dict]:
    catalog = Catalog.load()
    code = _code_digest()
    targets: dict[str, Target] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="cachectl-proofs-") as tmp:
        try:
            for a, b in pairs:
                for src, dst in ((a, b), (b, a)):
                    key = _key(catalog, src, dst, code)
                    saved = _load(_saved(src, dst), key)
                    if saved is not None:
                        print("%s -> %s: kept from an earlier run" % (src, dst), flush=True)
                        rows.append(saved)
                        continue
                    for t in (src, dst):
                        if t not in targets:
                            targets[t] = Target(python_for(t))
                    models = _other_tensors(catalog, src, dst)
                    started = time.monotonic()
                    outcomes: Counter = Counter()
                    details: dict[str, list[str]] = defaultdict(list)
                    for name, dst_name in models:
                        try:
                            outcome, detail = prove(catalog, targets, src, dst, name, dst_name, Path(tmp))
                        except CachectlError as exc:
                            outcome, detail = "error", exc.problem
                        outcomes[outcome] += 1
                        details[outcome].append("%s: %s" % (name, detail))
                        print("%s -> %s %s: %s" % (src, dst, name, outcome), flush=True)
                    row = {"src": src, "dst": dst, "models": len(models), "outcomes": outcomes,
                           "details": dict(details), "seconds": time.monotonic() - started, "key": key}
                    _save(_saved(src, dst), row)
                    rows.append(row)
        finally:
            for t in targets.values():
                t.close()
    return rows


COLUMNS = ("converted, proven", "converted, unverified", "refused: computes differently", "refused: no plan",
           "refused: other", "not provable", "error", "converted, different")


def report(rows: list[dict]) -> list[str]:
    lines = [
        START, "",
        "### Migrations proven on the fingerprints", "",
        "Every model whose tensors differ between two fingerprinted releases, converted by cachectl from",
        "one to the other as a file of the source release's fingerprint weights, then run in the target",
        "(`python -m tools.migration_proofs`). \"converted, different\" counts files that convert and",
        "compute otherwise than the source's fingerprint: it must be 0.", "",
        "| from -> to | models | " + " | ".join(COLUMNS) + " | seconds |",
        "|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for row in rows:
        lines.append("| %s -> %s | %d | %s | %.0f |" % (
            row["src"], row["dst"], row["models"], " | ".join(str(row["outcomes"].get(c, 0)) for c in COLUMNS),
            row["seconds"]))
    reasons = [(row["src"], row["dst"], c, d) for row in rows for c in COLUMNS if c != "converted, proven"
               for d in row["details"].get(c, [])]
    if reasons:
        lines += ["", "Each model not converted with its math proven, and why:", "",
                  "| from -> to | outcome | model: reason |", "|---|---|---|"]
        lines += ["| %s -> %s | %s | %s |" % (s, d, c, r.replace("|", "/")) for s, d, c, r in reasons]
    return lines + ["", END]


def write(lines: list[str]) -> None:
    text = DOC.read_text()
    block = "\n".join(lines) + "\n"
    if START in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    DOC.write_text(text)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all-pairs", action="store_true")
    parser.add_argument("--print", action="store_true")
    args = parser.parse_args(argv)
    releases = list(Catalog.load().fingerprinted_releases)
    pairs = ([(a, b) for i, a in enumerate(releases) for b in releases[i + 1:]] if args.all_pairs
             else list(zip(releases, releases[1:])))
    lines = report(run(pairs))
    if args.print:
        print("\n".join(lines))
    else:
        write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
