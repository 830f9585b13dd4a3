"""One read of the whole store: every manifest once, as frozen values (each made when first
read), and what could not be read as warnings (a damaged or newer-format file never hides
the rest).

`list`, `show`, `verify`, `rm` and the prune plan all start from a `Snapshot`.

The scan index (`<root>/store-v1/scan-index.json`) makes a scan of an unchanged store cost
a stat of each manifest instead of a read. It holds what the last scan built from each
manifest folder (sources, converted, names, each environment's links) and each blob
folder's names, with the stat of every file and folder it came from. A manifest whose
stat (mtime, ctime, size, inode) is the same is taken from the index, any other is read;
a folder whose stat is the same has the same names (making, renaming or removing a name
changes its folder's mtime), so its listing is taken too. What changed less than
RACY_SECONDS before the scan is read and not indexed: its timestamp's tick may not be
over, and a second change within it would leave its stat the same. The index is derived:
missing, damaged, or of another layout, it is rebuilt; it is written (atomically, by the
store's writer) only when it changed and the user may write the store; a reader keeps it
in memory. The few files per environment (envs, pins, publications, views) are read on
every scan.

The index is JSON lines: the first holds each folder's names, stats and how many values
each manifest gave; each further line one field of one folder's values, parsed only when
a scan's caller reads that field (`list` reads 19 of the 35).
"""
from __future__ import annotations

import gc
import json
import os
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, fields
from itertools import accumulate
from types import MappingProxyType
from typing import Callable, Generic, Iterator, Mapping, Sequence, TypeVar

from .errors import CachectlError
from .store import (FORMAT, Converted, Environment, Link, Publication, Source, Store, Version, _converted,
                    _fields, _pins, _source)
from .tempnames import SUFFIX as TMP_SUFFIX


_CHUNK = 1 << 16  # a manifest is a few KB: one read; a big view.json takes a few
INDEX_NAME = "scan-index.json"
INDEX_LAYOUT = 2  # how the index holds what it holds: an index of another layout is rebuilt
RACY_SECONDS = 2.0  # longer than any filesystem's timestamp tick, and than the clock skew of a local one
# what each manifest folder's files are built into, by the name the index gives it
_SIG = "%x.%x.%x.%x"  # a file's mtime, ctime (ns), size and inode: unchanged, the index holds what it says
_UNINDEXED = "-"  # the stat of a file read on every scan
_KINDS = {"source": Source, "converted": Converted, "version": Version, "link": Link}
# the index from each Store's last scan, by the index file's stat: a process scanning
# again (the daemon, a reader who may not write it) parses it once
_MEMORY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
T = TypeVar("T")


class Manifests(Mapping[str, T], Generic[T]):
    """One kind of manifest by its key, each value made when first read. A listing reads a few
    fields of every entry: making 10,000 frozen values of 13 fields it never reads whole cost
    more than reading the index they come from."""

    def __init__(self, cls: type[T], key: str, columns: Mapping[str, list]):
        self._cls, self._columns = cls, columns
        self._keys = columns[key]
        self._at = {k: i for i, k in enumerate(self._keys)}  # a repeated key: the last one, as a dict
        self._made: dict[str, T] = {}
        self._every: list[list] | None = None  # every column, in field order, once a whole value is read

    def __getitem__(self, key: str) -> T:
        value = self._made.get(key)
        if value is None:
            i = self._at[key]
            if self._every is None:
                self._every = list(self._columns.values())
            value = self._made[key] = self._cls(*[col[i] for col in self._every])
        return value

    def __contains__(self, key) -> bool:
        return key in self._at

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)

    def column(self, field: str) -> dict[str, object]:
        """One field of every value, by key, without making the values."""
        col = self._columns[field]
        if len(self._at) == len(self._keys):  # no key repeated (a copied manifest repeats one)
            return dict(zip(self._keys, col))
        return {k: col[i] for k, i in self._at.items()}


class Values(Sequence[T], Generic[T]):
    """Manifest values in order (folder after folder, then by `order`), each made when first
    read; `column` reads one field of every value without making them."""

    def __init__(self, cls: type[T], parts: list[Mapping[str, list]],
                 order: Callable[[Values], list[int]] | None = None):
        self._cls, self._parts = cls, parts
        self._fields = _field_names(cls)
        self._joined: dict[str, list] = {}
        self._made: dict[int, T] = {}
        self._every: list[T] | None = None  # every value, once they are all read
        self._order: list[int] | None = None
        if order is not None:
            at = order(self)  # of the values as they are read
            self._joined.clear()
            self._order = None if at == list(range(len(at))) else at

    def column(self, field: str) -> list:
        col = self._joined.get(field)
        if col is None:
            col = [v for part in self._parts for v in part[field]] if len(self._parts) != 1 else self._parts[0][field]
            if self._order is not None:
                col = [col[i] for i in self._order]
            self._joined[field] = col
        return col

    def __len__(self) -> int:
        return len(self.column(self._fields[0]))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        if self._every is not None:
            return self._every[i]
        if i < 0:
            i += len(self)
        value = self._made.get(i)
        if value is None:
            if not 0 <= i < len(self):
                raise IndexError(i)
            value = self._made[i] = self._cls(*[self.column(f)[i] for f in self._fields])
        return value

    def __iter__(self) -> Iterator[T]:
        if self._every is None:
            self._every = list(map(self._cls, *[self.column(f) for f in self._fields]))
        return iter(self._every)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]


def _by_name_and_version(versions: Values) -> list[int]:
    keys = list(zip(versions.column("name"), versions.column("version")))
    return sorted(range(len(keys)), key=keys.__getitem__)


@dataclass(frozen=True)
class Snapshot:
    envs: tuple[Environment, ...]  # registered (the default one once it was first used)
    sources: Manifests[Source]  # by sha256
    converted: Manifests[Converted]  # by id
    versions: Values[Version]  # by name, then version
    links: Values[Link]
    pins: Mapping[str, Mapping[str, int]]  # env -> name -> version
    publications: tuple[Publication, ...]
    views: Mapping[str, Mapping]  # env -> its view.json
    linked: frozenset[str]  # names of the blob files a view links to, current or in grace
    blobs: tuple[str, ...]  # "<ab>/<file>" under blobs/sha256
    leftovers: tuple[str, ...]  # temporaries of interrupted writes (absolute paths)
    warnings: tuple[str, ...]  # files that could not be read, each with what to do

    def versions_of(self, name: str) -> tuple[Version, ...]:
        return tuple(v for v in self.versions if v.name == name)

    def by_source(self) -> tuple[Mapping[str, list[Link]], Mapping[str, list[Converted]]]:
        """(links, converted files) of each source sha256."""
        links: dict[str, list[Link]] = defaultdict(list)
        for link in self.links:
            links[link.source].append(link)
        converted: dict[str, list[Converted]] = defaultdict(list)
        for c in self.converted.values():
            converted[c.source].append(c)
        return links, converted

    def converted_size(self) -> Mapping[str, int]:
        """Bytes of converted copies of each source."""
        out: dict[str, int] = defaultdict(int)
        for source, size in zip(self.converted.column("source").values(), self.converted.column("size").values()):
            out[source] += size
        return out


def scan(store: Store) -> Snapshot:
    # a scan makes some 300,000 objects for 10,000 entries and frees none of them: the cycle
    # collector's passes over them would find nothing, at a tenth of the scan's time
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _scan(store)
    finally:
        if collecting:
            gc.enable()


def _scan(store: Store) -> Snapshot:
    warnings: list[str] = []
    leftovers: list[str] = []
    index = _Index(store, warnings, leftovers)

    def listing(folder: str) -> list[str]:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        except OSError as exc:
            warnings.append("%s: cannot be listed (%s); its entries are left out" % (folder, exc.strerror))
            return []
        leftovers.extend(os.path.join(folder, n) for n in names if n.startswith(".") and n.endswith(TMP_SUFFIX))
        return sorted(n for n in names if n.endswith(".json") and not n.startswith("."))

    def each(folder: str, what: str, build: Callable[[dict, str], object]) -> list:
        out = []
        for name in listing(folder):
            built = _build(os.path.join(folder, name), what, build, warnings)
            if built is not None:
                out.append(built)
        return out

    sources = Manifests(Source, "sha256", index.manifests(store.sources, "source", "a source manifest",
                                                          lambda r, _: [_source(r)]))
    converted = Manifests(Converted, "id", index.manifests(store.converted, "converted", "a converted manifest",
                                                           lambda r, _: [_converted(r)]))
    versions = Values(Version, [index.manifests(store.names, "version", "a name's versions",
                                                lambda r, name: [Version(name=name, **v) for v in r["versions"]])],
                      _by_name_and_version)
    links = Values(Link, [index.manifests(store.links / env, "link", "a link", lambda r, _: [Link(**_fields(r))])
                          for env in sorted(_dirs(str(store.links)))])
    envs = each(str(store.envs), "an environment", lambda r, _: Environment(**_fields(r)))
    pins = dict(each(str(store.pins), "pins", lambda r, name: (name, MappingProxyType(dict(_pins(r))))))
    publications: list[Publication] = []
    raw = _read(str(store.publications), warnings)
    if raw is not None:
        try:
            publications = [Publication(**p) for p in raw["publications"]]
        except (TypeError, KeyError) as exc:
            warnings.append("%s: does not read as publications (%s)" % (store.publications, exc))
    views, linked = _views(store, warnings, leftovers)
    blobs = []
    for sub in sorted(_dirs(str(store.blobs))):
        blobs += ["%s/%s" % (sub, name) for name in index.names(store.blobs / sub)]
    for folder in (store.root, store.base, store.blobs.parent, store.blobs, store.links):
        listing(str(folder))  # temporaries right there
    index.save()
    return Snapshot(
        envs=tuple(sorted(envs, key=lambda e: e.name)), sources=sources,
        converted=converted, versions=versions, links=links, pins=MappingProxyType(pins),
        publications=tuple(publications),
        views=MappingProxyType(views), linked=frozenset(linked), blobs=tuple(blobs), leftovers=tuple(sorted(leftovers)),
        warnings=tuple(warnings))


def _build(path: str, what: str, build: Callable[[dict, str], object], warnings: list[str]):
    """What `build` makes of the manifest at `path`; None, with a warning, when it cannot."""
    raw = _read(path, warnings)
    if raw is None:
        return None
    try:
        return build(raw, os.path.basename(path)[:-5])
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        warnings.append("%s: does not read as %s (%s); cachectl verify reports it, remove it if it is not "
                        "needed" % (path, what, exc))
        return None


class _Index:
    """The scan index while one scan runs: the last one's folders, and this one's."""

    def __init__(self, store: Store, warnings: list[str], leftovers: list[str]):
        self.store, self.warnings, self.leftovers = store, warnings, leftovers
        self.path = store.base / INDEX_NAME
        self.stat, self.old = _load(store, self.path)
        self.new: dict[str, dict] = {}
        self.racy = time.time_ns() - int(RACY_SECONDS * 1e9)
        self._root = len(str(store.root)) + 1

    def _list(self, folder, keep: Callable[[str], bool]) -> tuple[int, str, dict] | None:
        """(the open folder, its key, its entry with "dir", "names" and "temps"), the names
        from the index when the folder's stat is the one indexed; None when it is absent."""
        path = str(folder)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.warnings.append("%s: cannot be listed (%s); its entries are left out" % (path, exc.strerror))
            return None
        st = os.fstat(fd)
        key = path[self._root:]
        sig = [st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        old = self.old.get(key)
        if old is not None and old["dir"] == sig:
            names, temps = old["names"], old["temps"]
        else:
            every = os.listdir(fd)
            names = sorted(n for n in every if keep(n))
            temps = sorted(n for n in every if n.startswith(".") and n.endswith(TMP_SUFFIX))
        self.leftovers.extend(os.path.join(path, n) for n in temps)
        return fd, key, {"dir": sig if max(sig[0], sig[1]) < self.racy else None, "names": names, "temps": temps}

    def names(self, folder) -> list[str]:
        """The names in a blob folder (not its hidden temporaries)."""
        listed = self._list(folder, lambda n: not n.startswith("."))
        if listed is None:
            return []
        fd, key, entry = listed
        os.close(fd)
        self.new[key] = entry
        return entry["names"]

    def manifests(self, folder, kind: str, what: str, build: Callable[[dict, str], list]) -> Mapping[str, list]:
        """What `build` makes of each manifest in `folder` (a list of values per file), in name
        order, as columns: each field's values, by field name."""
        listed = self._list(folder, lambda n: n.endswith(".json") and not n.startswith("."))
        if listed is None:
            return {f: [] for f in _field_names(_KINDS[kind])}
        fd, key, entry = listed
        try:
            return self._manifests(fd, str(folder), key, entry, kind, what, build)
        finally:
            os.close(fd)

    def _manifests(self, fd: int, folder: str, key: str, entry: dict, kind: str, what: str,
                   build: Callable[[dict, str], list]) -> Mapping[str, list]:
        cls = _KINDS[kind]
        names_of_fields = _field_names(cls)
        old = self.old.get(key)
        if old is not None and old.get("kind") != kind:
            old = None
        names = entry["names"]
        stat = os.stat
        try:
            stats = [stat(name, dir_fd=fd) for name in names]
        except OSError:
            stats = None  # one was removed or cannot be read since the listing: file by file, below
        else:
            # compared as the one string the index holds: splitting it made 31,000 strings a scan
            sigs = "/".join([_SIG % (s.st_mtime_ns, s.st_ctime_ns, s.st_size, s.st_ino) for s in stats])
            if old is not None and names == old["names"] and sigs == old["sigs"]:
                self.new[key] = {**old, "dir": entry["dir"], "temps": entry["temps"]}  # no manifest changed
                return old["cols"]
        indexed: dict[str, tuple[str, int, int]] = {}
        old_values: list = []
        if old is not None:
            ends = list(accumulate(old["count"]))
            indexed = {name: (sig, end - count, end)
                       for name, sig, count, end in zip(old["names"], _split(old["sigs"]), old["count"], ends)}
            old_values = list(map(cls, *old["cols"].values()))
        out, kept, listed, sigs, counts = [], [], [], [], []
        for i, name in enumerate(names):
            if stats is not None:
                st = stats[i]
            else:
                try:
                    st = stat(name, dir_fd=fd)
                except FileNotFoundError:
                    continue  # removed since it was listed
                except OSError as exc:
                    self.warnings.append("%s: cannot be read (%s)" % (os.path.join(folder, name), exc.strerror))
                    continue
            sig = _SIG % (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
            hit = indexed.get(name)
            if hit is not None and hit[0] == sig:
                values = old_values[hit[1]:hit[2]]
            else:
                values = _build(os.path.join(folder, name), what, build, self.warnings)
                if values is None or max(st.st_mtime_ns, st.st_ctime_ns) >= self.racy:
                    sig = _UNINDEXED  # read again next time: damaged, newer, or changed just now
                    values = values or []
            out += values
            listed.append(name)
            sigs.append(sig)
            if sig != _UNINDEXED:
                kept += values
            counts.append(0 if sig == _UNINDEXED else len(values))
        self.new[key] = {**entry, "names": listed, "kind": kind, "fields": names_of_fields,
                         "sigs": "/".join(sigs), "count": counts,
                         "cols": {f: [getattr(v, f) for v in kept] for f in names_of_fields}}
        return {f: [getattr(v, f) for v in out] for f in names_of_fields}

    def save(self) -> None:
        """Keep this scan's index: in the store when it changed and the user may write there,
        else in memory."""
        stat = self.stat
        if self.new == self.old:
            _MEMORY[self.store] = (stat, self.old)
            return
        if os.access(self.store.base, os.W_OK):
            folders, lines = {}, []
            for key, e in self.new.items():
                # names and stats as one string per folder ("/" is in no file name): a tenth of
                # the parsing of a list of strings
                folders[key] = head = {**e, "names": "/".join(e["names"])}
                if "cols" in e:
                    head["cols"] = len(lines)  # the line of its first field, after the first line
                    cols = e["cols"]
                    lines += [cols.line(f) if isinstance(cols, _Columns) else _json_line(cols[f]) for f in e["fields"]]
            data = b"\n".join([_json_line({"format": FORMAT, "index": INDEX_LAYOUT, "folders": folders}), *lines])
            try:
                self.store.write_file(self.path, data)
                stat = _stat(self.path)
            except OSError:
                pass  # a full disk, a read-only mount: derived data, rebuilt by the next scan that can write it
        _MEMORY[self.store] = (stat, self.new)


def _field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def _json_line(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()  # ASCII: a newline in a value is escaped


class _Columns(Mapping[str, list]):
    """An indexed folder's values, a list per field, each parsed from its line of the index
    when first read."""

    def __init__(self, path: str, fields: list[str], data: bytes, lines: list[tuple[int, int]], total: int,
                 tuples: frozenset[str]):
        self._path, self._data, self._total, self._tuples = path, data, total, tuples
        self._lines = dict(zip(fields, lines))
        self._parsed: dict[str, list] = {}

    def __getitem__(self, field: str) -> list:
        col = self._parsed.get(field)
        if col is None:
            try:
                col = json.loads(self.line(field))
                if field in self._tuples:
                    col = [tuple(v) for v in col]
            except (ValueError, TypeError):
                col = None
            if not isinstance(col, list) or len(col) != self._total:
                # written whole by one atomic rename: only a hand edit gets here
                raise CachectlError(self._path, "is damaged (its %s values)" % field,
                                    "Remove it: the next scan rebuilds it from the manifests.")
            self._parsed[field] = col
        return col

    def __iter__(self) -> Iterator[str]:
        return iter(self._lines)

    def __len__(self) -> int:
        return len(self._lines)

    def line(self, field: str) -> bytes:
        """The field's line as it was read: an unchanged folder is written back unparsed."""
        start, end = self._lines[field]
        return self._data[start:end]


def _stat(path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino


def _load(store: Store, path) -> tuple[tuple | None, dict]:
    """(the index file's stat, its folders as a scan uses them); no folders for an index that
    is absent, damaged or of another layout, and none of a folder whose entry is damaged."""
    stat = _stat(path)
    remembered = _MEMORY.get(store)
    if remembered is not None and remembered[0] == stat:
        return remembered
    if stat is None:
        return None, {}
    try:
        with open(path, "rb") as f:
            data = f.read()
        (start, end), *lines = _lines(data)
        raw = json.loads(data[start:end])
        if raw.get("format") != FORMAT or raw.get("index") != INDEX_LAYOUT:
            return stat, {}
        folders = {key: _entry(e, data, lines, str(path)) for key, e in raw["folders"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return stat, {}
    return stat, {key: e for key, e in folders.items() if e is not None}


def _lines(data: bytes) -> list[tuple[int, int]]:
    """Where each line of `data` starts and ends: its fields are sliced from it only when parsed,
    not all copied out of it."""
    spans, start = [], 0
    while (end := data.find(b"\n", start)) >= 0:
        spans.append((start, end))
        start = end + 1
    return spans + [(start, len(data))]


def _entry(raw: dict, data: bytes, lines: list[tuple[int, int]], path: str) -> dict | None:
    """A folder's entry as a scan uses it (names as a list, its values as _Columns of the
    `lines` of `data`), or None unless it has the shape this cachectl writes."""
    e = {**raw, "names": _split(raw["names"])}
    if not isinstance(e["temps"], list):
        return None
    if "kind" not in e:
        return e  # a blob folder's names
    cls = _KINDS.get(e["kind"])
    if cls is None or e["fields"] != _field_names(cls):
        return None  # written by a cachectl whose manifests hold other fields
    if not isinstance(e["sigs"], str):
        return None
    counts = e["count"]
    sigs = e["sigs"].count("/") + 1 if e["sigs"] else 0
    if not len(e["names"]) == sigs == len(counts) or min(counts, default=0) < 0:
        return None
    first, n = e["cols"], len(e["fields"])
    if type(first) is not int or not 0 <= first <= len(lines) - n:
        return None
    e["cols"] = _Columns(path, e["fields"], data, lines[first:first + n], sum(counts), _tuple_fields(cls))
    return e


def _split(joined: str) -> list[str]:
    """The names or stats of a folder, held as one string ("/" is in no file name)."""
    return joined.split("/") if joined else []


def _tuple_fields(cls) -> frozenset[str]:
    # the index holds JSON arrays; the values hold tuples
    return frozenset(f.name for f in fields(cls) if f.type.startswith("tuple"))


def _read(path: str, warnings: list[str]) -> dict | None:
    try:
        # os.open/os.read: no file object per manifest, a third of the cost of 10,000 reads
        fd = os.open(path, os.O_RDONLY)
        try:
            data = chunk = os.read(fd, _CHUNK)
            while len(chunk) == _CHUNK:
                chunk = os.read(fd, _CHUNK)
                data += chunk
        finally:
            os.close(fd)
        raw = json.loads(data)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        warnings.append("%s: is damaged (%s); cachectl verify reports it, remove it if it is not needed" % (path, exc))
        return None
    except OSError as exc:
        warnings.append("%s: cannot be read (%s)" % (path, exc.strerror))
        return None
    if not isinstance(raw, dict):
        warnings.append("%s: is damaged (not a JSON object); remove it if it is not needed" % path)
        return None
    if isinstance(raw.get("format"), int) and raw["format"] > FORMAT:
        warnings.append("%s: was written by a newer cachectl (format %d; this one reads %d): left out" % (
            path, raw["format"], FORMAT))
        return None
    return raw
def _dirs(folder: str) -> list[str]:
    try:
        return [e.name for e in os.scandir(folder) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    except FileNotFoundError:
        return []


def _views(store: Store, warnings: list[str], leftovers: list[str]) -> tuple[dict, set[str]]:
    """Each view's view.json, the blob names any view links to, and its temporaries."""
    views: dict[str, dict] = {}
    linked: set[str] = set()
    root = os.path.join(store.root, "views")
    for env in sorted(_dirs(root)):
        raw = _read(os.path.join(root, env, "view.json"), warnings)
        if raw is not None:
            views[env] = raw
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                linked.add(os.path.basename(os.readlink(path)))
            elif name.startswith(".") and name.endswith(TMP_SUFFIX) and name in filenames:
                leftovers.append(path)
    return views, linked
