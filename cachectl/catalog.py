"""The layout catalog: which timm releases produce which state-dict layout, for every model.

Built from the real releases by `cachectl catalog build` and shipped in the package;
see cachectl/catalog_build.py for the format (versioned by FORMAT_VERSION).
"""
from __future__ import annotations

import functools
import gzip
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Mapping, TypeVar

from .errors import CachectlError
from .layout import Layout

T = TypeVar("T")

# 2: each release stored as its changes from the one before (1: every release whole)
FORMAT_VERSION = 2
# 2: each model's row a JSON string, decoded when asked for (1: rows as lists, so a process
# comparing one pair of models decoded all 29,761 rows: 110 of the 140 ms the file cost it)
FINGERPRINTS_VERSION = 2
CATALOG_DIR = Path(__file__).resolve().parent / "data" / "catalog"
# Fingerprints are taken with one torch for every release, so outputs of unchanged code
# agree to float32 round-off. Measured on the shipped fingerprints (5,600 same-tensor pairs):
# unchanged models at most 4.8e-6 apart (relative) across releases, the smallest real change
# (gcresnet50t, LayerNorm eps 1e-5 -> 1e-6 after 0.5.4) 7e-5 apart.
FINGERPRINT_RTOL = 2e-5


@functools.lru_cache(maxsize=None)  # few distinct versions, sorted thousands of times a conversion
def version_key(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@dataclass(frozen=True)
class ModelEntry:
    """One model name in one release."""

    name: str
    release: str
    layout_index: int
    family: str
    classifier: tuple[str, ...]
    default_num_classes: int | None


@dataclass(frozen=True)
class PretrainedTag:
    tag: str
    hf_hub_id: str | None
    url: str | None
    num_classes: int | None


@dataclass(frozen=True)
class Fingerprint:
    """What one model of one release computes from deterministic weights on a fixed input.

    Made by cachectl/_fingerprint.py when the catalog is built; compare with same_math()."""

    release: str
    name: str
    method: int  # fingerprints of different methods are not compared
    weights: str  # id of the generated (key, shape) entries: only equal ids are comparable
    input: tuple[int, ...]  # the input's size (C, H, W): only equal sizes are comparable
    shape: tuple[int, ...]
    total: float  # sum of the output
    abs_total: float  # sum of its absolute values
    values: tuple[float, ...]  # evenly spaced samples of the flattened output

    @classmethod
    def taken(cls, release: str, name: str, fp: Mapping) -> "Fingerprint":
        """A fingerprint as cachectl/_fingerprint.py prints it."""
        return cls(release, name, fp["method"], fp["weights"], tuple(fp["input"]), tuple(fp["shape"]), fp["sum"],
                   fp["abs"], tuple(fp["values"]))


def same_math(a: Fingerprint | None, b: Fingerprint | None, rtol: float = FINGERPRINT_RTOL) -> bool | None:
    """True: a and b compute the same; False: they differ; None: unknown (a side has no
    fingerprint, their state dicts differ so the same weights cannot be given to both, or
    they were run on inputs of different sizes)."""
    if a is None or b is None or (a.method, a.weights, a.input) != (b.method, b.weights, b.input):
        return None
    if a.shape != b.shape or len(a.values) != len(b.values):
        return False
    n = 1
    for s in a.shape:
        n *= s
    scale = max(a.abs_total, b.abs_total)
    mean = scale / max(n, 1)
    if abs(a.abs_total - b.abs_total) > rtol * scale or abs(a.total - b.total) > rtol * scale + 1e-6:
        return False
    return all(abs(x - y) <= rtol * max(mean, abs(x), abs(y)) + 1e-6 for x, y in zip(a.values, b.values))


# A release's tables, stored as what changed from the release before it: from one release to
# the next most models keep their layout, tags and names, so forty releases read about as
# fast as ten whole ones would (the index is read by every command that identifies a file).
RELEASE_TABLES = ("models", "failed", "tags", "deprecated")
_ABSENT = object()


def compact(index: dict) -> dict:
    """`index` (every release whole, as catalog_build.merge makes it) as it is written."""
    releases, before, base = {}, None, None
    for version in sorted(index["releases"], key=version_key):
        rel = index["releases"][version]
        out: dict = {"base": base}
        for table in RELEASE_TABLES:
            now, old = rel[table], (before[table] if before else {})
            out[table] = {"+": {k: v for k, v in now.items() if old.get(k, _ABSENT) != v},
                          "-": sorted(k for k in old if k not in now)}
        releases[version] = out
        before, base = rel, version
    return {**index, "releases": releases}


def expand(index: dict, path: Path) -> dict:
    """The written `index` with every release whole again; CachectlError if it does not chain."""
    releases, before, base = {}, None, None
    try:
        for version in sorted(index["releases"], key=version_key):
            rel = index["releases"][version]
            if rel["base"] != base:
                raise ValueError("timm %s is stored against %s, not %s" % (version, rel["base"], base))
            whole = {}
            for table in RELEASE_TABLES:
                now = dict(before[table]) if before else {}
                for k in rel[table]["-"]:
                    del now[k]
                now.update(rel[table]["+"])
                whole[table] = now
            releases[version] = whole
            before, base = whole, version
    except (KeyError, TypeError, ValueError) as exc:
        raise CachectlError(path, "the catalog is damaged (%s)" % exc, "Reinstall cachectl.")
    return {**index, "releases": releases}


def index_path() -> Path:
    return CATALOG_DIR / ("index-v%d.json.gz" % FORMAT_VERSION)


def layouts_path() -> Path:
    return CATALOG_DIR / ("layouts-v%d.json.gz" % FORMAT_VERSION)


def fingerprints_path() -> Path:
    return CATALOG_DIR / ("fingerprints-v%d.json.gz" % FINGERPRINTS_VERSION)


def _per_catalog(method: Callable[..., T]) -> Callable[..., T]:
    """`method`'s answers kept by the catalog object itself (`Catalog.remember`): a cache on
    the class would hold every catalog a daemon ever loaded, and the tables they decoded."""

    @functools.wraps(method)
    def kept(self: "Catalog", *args):
        return self.remember((method.__name__, *args), lambda: method(self, *args))

    return kept


class Catalog:
    def __init__(self, data: dict, path: Path):
        if data.get("format") != "cachectl-catalog" or data.get("version") != FORMAT_VERSION:
            raise CachectlError(path, "is not a version %d cachectl catalog" % FORMAT_VERSION,
                                "Reinstall cachectl, or rebuild the catalog with cachectl catalog build.")
        self.path = path
        self._data = expand(data, path)
        self.releases: tuple[str, ...] = tuple(sorted(self._data["releases"], key=version_key))
        self._specs = [tuple(s) for s in data["classifier_specs"]]
        self._remembered: dict[Hashable, object] = {}

    def remember(self, key: Hashable, compute: Callable[[], T]) -> T:
        """What `compute` answers from this catalog for `key`, computed once per catalog: a
        daemon meets the same layouts and models file after file. Answers go with the
        catalog when it is replaced (an environment catalogued anew)."""
        if key not in self._remembered:
            self._remembered[key] = compute()
        return self._remembered[key]  # type: ignore[return-value]

    @classmethod
    def load(cls, path: Path | None = None) -> "Catalog":
        return _load(path or index_path())

    def _entry(self, release: str, name: str, row: list) -> ModelEntry:
        idx, family, spec, nc = row
        return ModelEntry(name, release, idx, family, self._specs[spec] if spec >= 0 else (), nc)

    @_per_catalog
    def models(self, release: str) -> dict[str, ModelEntry]:
        return {name: self._entry(release, name, row) for name, row in self._data["releases"][release]["models"].items()}

    def model(self, release: str, name: str) -> ModelEntry | None:
        """`models(release).get(name)`, without making the release's other entries."""
        row = self._data["releases"][release]["models"].get(name)
        return None if row is None else self._entry(release, name, row)

    def layout(self, index: int) -> Layout:
        return Layout.from_rows(self._layouts()[index])

    def deprecated(self, release: str) -> dict[str, str]:
        return self._data["releases"][release]["deprecated"]

    def failed(self, release: str) -> dict[str, str]:
        return self._data["releases"][release]["failed"]

    def tags(self, release: str, name: str) -> list[PretrainedTag]:
        raw = self._data["releases"][release]["tags"].get(name, {})
        return [PretrainedTag(t, *v) for t, v in raw.items()]

    @property
    def fingerprinted_releases(self) -> tuple[str, ...]:
        return tuple(r for r in self.releases if r in self._fingerprints())

    def fingerprint(self, release: str, name: str) -> Fingerprint | None:
        """The fingerprint of model `name` (a pretrained tag is ignored) in `release`, if taken."""
        base = name.split(".")[0]
        rel = self._fingerprints().get(release)
        row = rel["models"].get(base) if rel else None
        if row is None:
            return None
        weights, size, shape, total, abs_total, values = json.loads(row)
        return Fingerprint(release, base, rel.get("method"), weights, tuple(size), tuple(shape), total, abs_total,
                           tuple(values))

    def why_no_fingerprint(self, release: str, name: str) -> str | None:
        """Why `name` has no fingerprint in `release` (None when it has one)."""
        base = name.split(".")[0]
        rel = self._fingerprints().get(release)
        if rel is None:
            return "the catalog holds no fingerprints of timm %s" % release
        if base in rel["models"]:
            return None
        for kind in ("skipped", "failed"):
            if base in rel[kind]:
                return "%s of timm %s was not fingerprinted (%s)" % (base, release, rel[kind][base])
        if not rel.get("complete", True) and base in self.models(release):
            return "the catalog's fingerprints of timm %s do not reach %s yet" % (release, base)
        return "timm %s has no model %s" % (release, base)

    def by_layout(self, lid: str) -> list[ModelEntry]:
        """The (model, release) entries of layout `lid`, by release. Only those entries are
        made: inspect asks for one layout, and all of them cost it a tenth of its time."""
        index = self._layout_index().get(lid)
        rows = self._rows_by_layout().get(index, ())
        return [self._entry(release, name, row) for release, name, row in rows]

    @_per_catalog  # asked once per conversion: every release's table read, 5 ms
    def renames(self, arch: str) -> tuple[str, ...]:
        """`arch`, its newer names (the releases' deprecation tables) and the older names
        that became it, newest release first."""
        names = [arch]
        for release in reversed(self.releases):
            table = self.deprecated(release)
            if arch in table and table[arch] not in names:
                names.append(table[arch])
            names += [old for old, new in table.items() if new.split(".")[0] == arch and old not in names]
        return tuple(names)

    @_per_catalog
    def _rows_by_layout(self) -> dict[int, list[tuple[str, str, list]]]:
        """Every (release, name, row), by layout: one pass over the catalog, where each
        layout asked for was one pass (7 ms; the daemon asks once per conversion)."""
        rows: dict[int, list] = defaultdict(list)
        for release in self.releases:
            for name, row in self._data["releases"][release]["models"].items():
                rows[row[0]].append((release, name, row))
        return rows

    def by_body(self, classifier: tuple[str, ...], body_id: str) -> list[ModelEntry]:
        return self._by_body().get((classifier, body_id), [])

    def classifier_specs(self) -> list[tuple[str, ...]]:
        return list(self._specs)

    @_per_catalog
    def _layout_index(self) -> dict[str, int]:
        return {lid: i for i, lid in enumerate(self._data["layout_ids"])}

    @_per_catalog
    def _by_body(self) -> dict[tuple, list[ModelEntry]]:
        bodies = {(li, si): bid for li, si, bid in self._data["bodies"]}
        spec_index = {s: i for i, s in enumerate(self._specs)}
        by_body: dict[tuple, list[ModelEntry]] = defaultdict(list)
        for release in self.releases:
            for entry in self.models(release).values():
                if entry.classifier:
                    body = bodies[(entry.layout_index, spec_index[entry.classifier])]
                    by_body[(entry.classifier, body)].append(entry)
        return by_body

    @_per_catalog
    def _layouts(self) -> list:
        path = layouts_path() if self.path == index_path() else self.path.with_name(
            self.path.name.replace("index-", "layouts-"))
        with gzip.open(path, "rt") as f:
            return json.load(f)

    @_per_catalog
    def _fingerprints(self) -> dict:
        path = fingerprints_path() if self.path == index_path() else self.path.with_name(
            "fingerprints-v%d.json.gz" % FINGERPRINTS_VERSION)
        try:
            with gzip.open(path, "rt") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}  # a catalog without fingerprints: every comparison is unknown
        except (OSError, ValueError) as exc:
            raise CachectlError(path, "the catalog's fingerprints are damaged (%s)" % exc, "Reinstall cachectl.")
        if data.get("format") != "cachectl-fingerprints" or data.get("version") != FINGERPRINTS_VERSION:
            return {}  # another format: unknown, never misread
        return data["releases"]

    @_per_catalog
    def largest_layout(self) -> int:
        """The most tensors any catalogued layout has."""
        return max((len(rows) for rows in self._layouts()), default=0)

    @_per_catalog
    def layout_key_sets(self) -> list[tuple[int, frozenset]]:
        return [(i, frozenset((k, tuple(s)) for k, s, _ in rows)) for i, rows in enumerate(self._layouts())]


def name_candidates(catalog: Catalog, arch: str, hint: str | None = None) -> list[str]:
    """`arch`, its newer names (the releases' deprecation tables) and the older names that
    became it; first `hint`, a pretrained tag of `arch` the file names (from config.json)."""
    names = list(catalog.renames(arch))
    if hint and hint.split(".")[0] == arch and "." in hint:
        names = [hint] + [n for n in names if n != hint]
    return names


@functools.lru_cache(maxsize=4)
def _load(path: Path) -> Catalog:
    try:
        with gzip.open(path, "rt") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise CachectlError(path, "the catalog is damaged (%s)" % exc, "Reinstall cachectl.")
    return Catalog(data, path)
