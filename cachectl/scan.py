"""One read of the whole store: every manifest once, as frozen values, and what could not be
read as warnings (a damaged or newer-format file never hides the rest).

`list`, `show`, `verify`, `rm` and the prune plan all start from a `Snapshot`.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from .store import (FORMAT, Converted, Environment, Link, Publication, Source, Store, Version, _converted,
                    _fields, _pins, _source)
from .tempnames import SUFFIX as TMP_SUFFIX


_CHUNK = 1 << 16  # a manifest is a few KB: one read; a big view.json takes a few


@dataclass(frozen=True)
class Snapshot:
    envs: tuple[Environment, ...]  # registered (the default one once it was first used)
    sources: Mapping[str, Source]  # by sha256
    converted: Mapping[str, Converted]  # by id
    versions: tuple[Version, ...]  # by name, then version
    links: tuple[Link, ...]
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
        for c in self.converted.values():
            out[c.source] += c.size
        return out


def scan(store: Store) -> Snapshot:
    warnings: list[str] = []
    leftovers: list[str] = []

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
            path = os.path.join(folder, name)
            raw = _read(path, warnings)
            if raw is None:
                continue
            try:
                out.append(build(raw, name[:-5]))
            except (TypeError, KeyError, ValueError, AttributeError) as exc:
                warnings.append("%s: does not read as %s (%s); cachectl verify reports it, remove it if it is not "
                                "needed" % (path, what, exc))
        return out

    sources = {s.sha256: s for s in each(str(store.sources), "a source manifest", lambda r, _: _source(r))}
    converted = {c.id: c for c in each(str(store.converted), "a converted manifest", lambda r, _: _converted(r))}
    versions: list[Version] = []
    for vs in each(str(store.names), "a name's versions",
                   lambda r, name: [Version(name=name, **v) for v in r["versions"]]):
        versions += vs
    links: list[Link] = []
    for env in sorted(_dirs(str(store.links))):
        links += each(os.path.join(store.links, env), "a link", lambda r, _: Link(**_fields(r)))
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
        for name in os.listdir(os.path.join(store.blobs, sub)):
            if name.startswith("."):
                if name.endswith(TMP_SUFFIX):
                    leftovers.append(os.path.join(store.blobs, sub, name))
            else:
                blobs.append("%s/%s" % (sub, name))
    for folder in (store.root, store.base, store.blobs.parent, store.blobs, store.links):
        listing(str(folder))  # temporaries right there
    return Snapshot(
        envs=tuple(sorted(envs, key=lambda e: e.name)), sources=MappingProxyType(sources),
        converted=MappingProxyType(converted), versions=tuple(sorted(versions, key=lambda v: (v.name, v.version))),
        links=tuple(links), pins=MappingProxyType(pins), publications=tuple(publications),
        views=MappingProxyType(views), linked=frozenset(linked), blobs=tuple(blobs), leftovers=tuple(sorted(leftovers)),
        warnings=tuple(warnings))


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
