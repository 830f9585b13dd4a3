"""What the cache does: ingest, convert per environment, resolve names, list, pin, verify.

The CLI, the daemon and the Python API all go through `Cache`; `Store` only persists.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import unicodedata
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import AmbiguousError, CachectlError
from .paths import default_root
from .store import (CONVERTED_SUFFIX, TORCH_SUFFIX, Converted, Environment, Link, Publication, Source, Store,
                    Version, sha256_file)

# torch loads with these, so only the commands that convert or read weights import them:
# listing, pinning and pruning stay quick
if TYPE_CHECKING:
    from .catalog import Catalog
    from .scan import Snapshot
    from .views import Entry, Skipped, ViewPlan
    from .headers import Header
    from .reader import Checkpoint
    from .target import Target

DEFAULT_ENV = "default"


def name_from_path(path: Path) -> str:
    """`swin_tiny.pth.tar` -> `swin_tiny`; an HF snapshot folder -> its repo's model name."""
    if path.is_dir():
        for part in (path.resolve().parent.parent.name, path.name):
            if part.startswith("models--"):
                return part.split("--")[-1]
        return path.name
    name = path.name
    for suffix in (".tar", ".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _user() -> str:
    import pwd

    try:
        return "user %s" % pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return "uid %d" % os.geteuid()


def _writers(root: Path) -> str:
    """Who may write the store at `root`: its owner, and its group if it is group-writable."""
    import grp
    import pwd

    st = root.stat()
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = "uid %d" % st.st_uid
    if not st.st_mode & 0o020:
        return "user %s" % owner
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = "gid %d" % st.st_gid
    return "user %s or a member of group %s" % (owner, group)


def _check_name(name: str) -> None:
    # a name becomes a file name in the store: it must stay one, inside the store
    if (not name or len(name) > 200 or name.startswith(".") or "/" in name or "\\" in name or "@" in name
            or any(ord(c) < 32 or ord(c) == 127 or unicodedata.category(c) == "Cf" for c in name)):
        raise CachectlError(None, "%r cannot be a name in the cache" % name,
                            "Give --name with letters, digits and - _ . (not starting with a dot, no / or @).")


@dataclass(frozen=True)
class AddResult:
    version: Version
    source: Source
    new_version: bool  # False: these bytes were already the newest version of the name
    links: tuple[Link, ...]


@dataclass(frozen=True)
class Row:
    name: str
    version: int
    architecture: str | None
    timm_versions: tuple[str, ...]
    source_size: int  # the stored file
    converted_size: int  # every converted copy of it (a copy that is the source itself: 0)
    environments: tuple[str, ...]  # environments with a converted copy
    pinned: tuple[str, ...]  # environments pinning this version
    created: float
    state: str  # ready | pending | converting | failed
    error: str | None
    source: str  # sha256
    served: tuple[str, ...] = ()  # "<pretrained name> in <env>": what views serve it as

    @property
    def ref(self) -> str:
        return "%s@%d" % (self.name, self.version)

    @property
    def size(self) -> int:
        return self.source_size + self.converted_size

    def to_json(self) -> dict:
        return {
            "name": self.name, "version": self.ref, "architecture": self.architecture,
            "timm_versions": list(self.timm_versions), "size": self.size, "source_size": self.source_size,
            "converted_size": self.converted_size,
            "environments": list(self.environments), "pinned": list(self.pinned),
            "state": self.state, "error": self.error, "created": self.created, "sha256": self.source,
            "served": list(self.served),
        }


@dataclass(frozen=True)
class Resolved:
    version: Version
    env: str
    converted: Converted
    path: Path


class Cache:
    def __init__(self, root: str | os.PathLike | None = None, create: bool = True):
        """`create` False: refuse a root that does not exist (a typo'd --root)."""
        self.store = Store(root or default_root()).init(create)
        self._targets: dict[str, Target] = {}
        self._catalog: Catalog | None = None
        self._catalog_stamp = ""

    def close(self) -> None:
        for t in self._targets.values():
            t.close()
        self._targets.clear()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def catalog(self) -> Catalog:
        """The shipped catalog with the releases this store catalogued itself (re-read when
        another process catalogues one: a running daemon learns of an `env add`)."""
        from . import local_catalog

        stamp = local_catalog.stamp(self.store)
        if self._catalog is None or stamp != self._catalog_stamp:
            self._catalog, self._catalog_stamp = local_catalog.load(self.store), stamp
        return self._catalog

    def catalogued_here(self) -> list[str]:
        """The timm releases this store catalogued itself (newer than the shipped catalog)."""
        from . import local_catalog

        return list(local_catalog.dumps(self.store))

    def _catalogue(self, env: Environment, say: Callable[[str], None] | None) -> None:
        """Catalogue `env`'s timm into the store when the shipped catalog lacks it (minutes:
        every model's layout, recorded in its own interpreter; resumed if interrupted)."""
        if env.python is None or env.timm in self.catalog.releases:
            return
        from . import local_catalog

        local_catalog.catalogue(self.store, env.python, env.timm, say or (lambda message: None))

    def target(self, env: Environment) -> Target:
        if env.name not in self._targets:
            from .target import Target

            self._targets[env.name] = Target(env.python)
        return self._targets[env.name]

    # -- environments ------------------------------------------------------------------

    def environments(self) -> list[Environment]:
        envs = {e.name: e for e in self.store.all_envs()}
        if DEFAULT_ENV not in envs:
            envs[DEFAULT_ENV] = self._probe(DEFAULT_ENV, None)
            self.store.put_env(envs[DEFAULT_ENV])
        return [envs[k] for k in sorted(envs)]

    def env(self, name: str | None) -> Environment:
        name = name or DEFAULT_ENV
        for e in self.environments():
            if e.name == name:
                return e
        raise CachectlError(None, "no environment named %s" % name,
                            "See cachectl env list, or register it: cachectl env add %s --python PY." % name)

    def env_here(self) -> Environment:
        """The registered environment this interpreter is: the Python API's default.

        Its timm must be the one running here (several environments may share an
        interpreter, told apart by PYTHONPATH); among those, the one registered with
        this interpreter or prefix, else the only one, else `default`."""
        import importlib.metadata
        import sys

        try:
            here = importlib.metadata.version("timm")
        except importlib.metadata.PackageNotFoundError:
            here = None
        same = [e for e in self.environments() if e.timm == here]
        exe = os.path.abspath(sys.executable)
        for e in same:
            python = e.python or exe
            if os.path.abspath(python) == exe or os.path.dirname(os.path.dirname(python)) == sys.prefix:
                return e
        if len(same) == 1:
            return same[0]
        if any(e.name == DEFAULT_ENV for e in same):
            return self.env(DEFAULT_ENV)
        raise CachectlError(None, "this interpreter (%s, timm %s) is none of the registered environments (%s)" % (
            exe, here or "not installed", ", ".join("%s: timm %s" % (e.name, e.timm) for e in self.environments())),
            "Register it (cachectl env add NAME --python %s), or pass env=NAME." % exe)

    def _probe(self, name: str, python: str | None) -> Environment:
        # a fresh agent: a running one keeps the timm it imported before an upgrade
        from .target import Target

        if name in self._targets:
            self._targets.pop(name).close()
        target = self._targets[name] = Target(python)
        info = target.info()
        return Environment(name=name, python=target.python, timm=info.timm, torch=info.torch, probed=time.time(),
                           hub=info.hub)

    def env_add(self, name: str, python: str, say: Callable[[str], None] | None = None) -> Environment:
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise CachectlError(None, "environment name %r has characters other than letters, digits, - _ ." % name,
                                "Choose a name like timm06 or prod-1.")
        if self.store.get_env(name):
            raise CachectlError(None, "environment %s exists" % name, "Use cachectl env refresh %s, or env rm it first." % name)
        env = self._probe(name, python)
        self.store.put_env(env)
        self._catalogue(env, say)
        self.refresh_views([name])
        return env

    def env_rm(self, name: str) -> int:
        """Forget `name`, its pins, links and view, and the converted files no other
        environment loads; the bytes freed."""
        self.env(name)
        if name == DEFAULT_ENV:
            raise CachectlError(None, "the default environment is the interpreter cachectl runs in",
                                "It cannot be removed; register other environments with cachectl env add.")
        self.store.remove_env(name)
        from . import views

        with self.store.lock("view:" + name):
            views.remove(self.store, name)
        return self._drop_unloaded_conversions()

    def _drop_unloaded_conversions(self) -> int:
        """Remove converted files no environment's link names and no view links, manifest
        before file; the bytes freed. A converter that links one meanwhile finds it gone
        and converts again (convert_for checks the file)."""
        snap = self.scan()
        loaded = {l.converted for l in snap.links if l.converted}
        kept_blobs = {b for c in snap.converted.values() if c.id in loaded for b in (c.sha256, c.torch_sha256) if b}
        freed = 0
        for c in snap.converted.values():
            if c.id in loaded:
                continue
            with self.store.lock("converted:" + c.id):
                self.store.remove_converted(c.id)
                for path, sha in ((self.store.converted_path(c), c.sha256), (self.store.torch_path(c), c.torch_sha256)):
                    if path is None or sha in kept_blobs or path.name in snap.linked or not path.exists():
                        continue
                    size = path.stat().st_size
                    path.unlink()
                    # a conversion that is the source itself is a second name of its blob: nothing freed
                    freed += 0 if sha == c.source else size
        return freed

    def env_refresh(self, name: str, progress: Callable[[str], None] | None = None,
                    say: Callable[[str], None] | None = None) -> tuple[Environment, Environment]:
        """Re-probe `name`; when its timm changed, convert what its names need for the new one."""
        old = self.env(name)
        new = self._probe(name, old.python)
        self.store.put_env(new)
        self._catalogue(new, say)
        if new.timm != old.timm:
            for sha in {v.source for v in self._needed_versions(new)}:
                if progress:
                    progress(sha)
                self.convert_for(sha, new)
        self.refresh_views([name])
        return old, new

    def _needed_versions(self, env: Environment, versions: list[Version] | None = None) -> list[Version]:
        """The version each name resolves to in `env`: its pin, else the newest (of
        `versions`, when the caller read them already)."""
        pins = self.store.pins_of(env.name)
        newest: dict[str, Version] = {}
        out = []
        for v in self.store.all_versions() if versions is None else versions:
            if pins.get(v.name) == v.version:
                out.append(v)
            elif v.name not in pins and (v.name not in newest or v.version > newest[v.name].version):
                newest[v.name] = v
        return out + list(newest.values())

    # -- ingest and convert --------------------------------------------------------------

    def add(self, path: str | os.PathLike, name: str | None = None,
            progress: Callable[[str], None] | None = None, *, model: str | None = None,
            prefixes: tuple[str, ...] = (), source_timm: str | None = None) -> AddResult:
        """Ingest `path` as a new version of `name` and convert it for every environment.

        `model` says what the file is where look-alikes share its layout, `prefixes` where
        its timm models sit in a larger state dict; both are recorded with the source and
        used by every later conversion of it. Saying them again for stored bytes replaces
        what was said before and converts anew."""
        from .headers import NotPlain, read_header
        from .reader import read

        path = Path(path)
        name = name or name_from_path(path)
        _check_name(name)
        # unreadable files are refused before anything is stored. A file's headers say it
        # without torch (tensor records only, no bytes): torch's unpickler, the costliest
        # part of a small file, then reads the stored copy once, and only when needed.
        # What the headers cannot say (and a snapshot folder's config.json) the reader judges.
        try:
            head: Header | Checkpoint = read(path) if path.is_dir() else read_header(path)
        except NotPlain:
            head = read(path)
        # a full disk is the store's problem, said as such; every write below leaves nothing half-done
        with self.store.room(head.size):
            sha, size = self.store.ingest_file(head.weights)
            blob = self.store.blob_path(sha)
            loaded: list[Checkpoint] = []

            def stored() -> Checkpoint:
                # identified and converted from the bytes the store recorded, never from the
                # watched file, which its writer may change meanwhile; what the file said of
                # itself (config.json, the hub repo) stays
                if not loaded:
                    loaded.append(dataclasses.replace(read(blob), path=head.path, hints=head.hints))
                return loaded[0]

            # prune takes this lock to delete a source: held from here until a version names it
            with self.store.lock("source:" + sha):
                if not blob.exists():  # a prune took the bytes since: again
                    self.store.ingest_file(head.weights)
                source = self.store.get_source(sha)
                said = (model, tuple(prefixes), source_timm)
                changed = source is not None and any(said) and said != (source.model, source.prefixes, source.source_timm)
                if source is None or changed:
                    try:
                        ckpt = stored()
                    except CachectlError:
                        if source is None:  # refused (what its headers did not show): none of it is kept
                            blob.unlink(missing_ok=True)
                            read(path)  # the refusal said of the user's file, not of the store's copy
                        raise
                    source = self._identify(ckpt, sha, size, model=model, prefixes=tuple(prefixes), source_timm=source_timm)
                    self.store.put_source(source)
                version, is_new = self._new_version(name, sha, str(path.absolute()))
            links = []
            for env in self.environments():
                if progress:
                    progress(env.name)
                links.append(self.convert_for(sha, env, stored, again=bool(changed)))
            if is_new and self._touches_views(version):
                self.refresh_views()
            return AddResult(version, source, is_new, tuple(links))

    def _identify(self, ckpt: Checkpoint, sha: str, size: int, model: str | None = None,
                  prefixes: tuple[str, ...] = (), source_timm: str | None = None) -> Source:
        from .identify import find

        base = dict(sha256=sha, size=size, origin=str(ckpt.path.absolute()), added=time.time(), format=ckpt.format,
                    model=model, prefixes=prefixes, source_timm=source_timm)
        try:
            tag = find(ckpt, self.catalog, model=model, prefixes=prefixes or None).tags[0]
        except CachectlError as exc:
            return Source(**base, error=str(exc))
        b = tag.best
        return Source(**base, architecture=b.architecture, timm_versions=b.timm_versions,
                      confidence=tag.confidence, num_classes=b.num_classes)

    def _new_version(self, name: str, sha: str, origin: str) -> tuple[Version, bool]:
        with self.store.lock("name:" + name):
            versions = self.store.versions(name)
            if versions and versions[-1].source == sha:
                return versions[-1], False
            v = Version(name, (versions[-1].version + 1) if versions else 1, sha, time.time(), origin)
            self.store.put_versions(name, versions + [v])
            return v, True

    def convert_for(self, sha: str, env: Environment, stored: Callable[[], Checkpoint] | None = None,
                    again: bool = False, what: str | None = None) -> Link:
        """The link from `env` to its converted copy of source `sha`, converting at most once
        (`again`: once more, after the user said anew what the source is). `stored`: how the
        caller reads the stored source, called only if a conversion needs it. `what`: the
        version asked for, named if this user cannot convert it."""
        link = self.store.get_link(env.name, sha)
        if not again and link and link.timm == env.timm and (link.error or self._converted_ok(link.converted)):
            return link  # decided already: no lock, so readers without write access get it too
        if not os.access(self.store.links, os.W_OK):
            raise CachectlError(None, "%s is not converted for environment %s yet, and %s cannot write to the cache %s" % (
                what or "source %s" % sha[:12], env.name, _user(), self.store.root),
                "Ask %s to run: %s (or let the daemon do it)." % (_writers(self.store.root), (
                    "cachectl path %s --env %s" % (what, env.name)) if what else "cachectl views refresh --env %s" % env.name))
        with self.store.lock("convert:%s:%s" % (sha, env.name)):
            link = self.store.get_link(env.name, sha)
            if not again and link and link.timm == env.timm and (link.error or self._converted_ok(link.converted)):
                return link
            source = self.store.get_source(sha)
            if source is None:
                raise CachectlError(None, "no source %s in the store" % sha[:12], "Add the file again with cachectl add.")
            if source.error:
                link = Link(env.name, sha, env.timm, None, source.error, time.time())
            else:
                link = self._convert(source, env, stored)
            self.store.put_link(link)
            return link

    def _converted_ok(self, cid: str | None) -> bool:
        c = self.store.get_converted(cid) if cid else None
        return c is not None and self.store.converted_path(c).exists()

    def _convert(self, source: Source, env: Environment, stored: Callable[[], Checkpoint] | None) -> Link:
        from .convert import prepare, write_prepared
        from .reader import read

        try:
            if stored is not None:
                ckpt = stored()
            else:
                ckpt = dataclasses.replace(read(self.store.blob_path(source.sha256)), path=Path(source.origin))
            try:
                prepared = prepare(ckpt, self.target(env), catalog=self.catalog, model=source.model,
                                   prefixes=source.prefixes or None, source_timm=source.source_timm)
            except AmbiguousError:
                if source.model or not source.architecture or source.confidence == "ambiguous":
                    raise
                # decided when it was added, by what the file said then (config.json, its
                # name): identification happens once per file
                prepared = prepare(ckpt, self.target(env), catalog=self.catalog, model=source.architecture,
                                   prefixes=source.prefixes or None, source_timm=source.source_timm)
            cid = "%s-%s" % (source.sha256[:16], prepared.target_layout)
            if source.model or source.prefixes or source.source_timm:
                # what the user said the file is picks among look-alikes of one layout:
                # another answer is another conversion, never the earlier one reused
                said = json.dumps([source.model, list(source.prefixes)] + ([source.source_timm] if source.source_timm else []))
                import hashlib  # here: listing never hashes (store.py says why)

                cid += "-" + hashlib.sha1(said.encode()).hexdigest()[:8]
            with self.store.lock("converted:" + cid):
                if not self._converted_ok(cid):
                    recipe = None
                    if prepared.unchanged:
                        # the stored source is already the answer: linked, not copied
                        digest, size = self.store.link_blob(source.sha256, CONVERTED_SUFFIX), source.size
                        model, steps = prepared.model, prepared.attempt.steps + ("the stored source itself, linked",)
                    else:
                        if ckpt.weights != self.store.blob_path(source.sha256):
                            raise AssertionError("a recipe names the stored source's bytes, not %s" % ckpt.weights)
                        tmp = self.store.new_tmp(".safetensors")
                        try:
                            result = write_prepared(prepared, tmp, source.sha256, sync_folder=False)
                            recipe = result.recipe.as_json()
                            digest, size = self.store.publish_blob(tmp, CONVERTED_SUFFIX, result.recipe.name(source.sha256))
                        finally:
                            tmp.unlink(missing_ok=True)
                        model, steps = result.model, result.steps
                    self.store.put_converted(Converted(
                        id=cid, source=source.sha256, target_layout=prepared.target_layout,
                        target_timm=prepared.target_timm, model=model.name,
                        model_kwargs=dict(model.kwargs), sha256=digest, size=0 if prepared.unchanged else size,
                        created=time.time(), steps=steps, recipe=recipe,
                    ))
            return Link(env.name, source.sha256, env.timm, cid, None, time.time())
        except CachectlError as exc:
            return Link(env.name, source.sha256, env.timm, None, str(exc), time.time())

    # -- names, pins, paths ---------------------------------------------------------------

    def find_version(self, ref: str, env: str | None = None) -> Version:
        """NAME@VERSION, or NAME: its pin in `env` (when given), else its newest version."""
        name, _, wanted = ref.partition("@")
        versions = self.store.versions(name)
        if not versions:
            raise CachectlError(None, "nothing named %s in the cache" % name, "See cachectl list, or add it: cachectl add FILE --name %s." % name)
        if not wanted and env is not None:
            pinned = self.store.pins_of(env).get(name)
            wanted = str(pinned) if pinned else ""
        if not wanted:
            return versions[-1]
        for v in versions:
            if str(v.version) == wanted:
                return v
        raise CachectlError(None, "%s has no version %s (it has %s)" % (name, wanted, ", ".join(str(v.version) for v in versions)),
                            "Use one of those: cachectl list shows them.")

    def resolve(self, ref: str, env: str | None = None) -> Resolved:
        environment = self.env(env)
        version = self.find_version(ref, environment.name)
        link = self.convert_for(version.source, environment, what=version.ref)
        if link.error:
            raise CachectlError(None, "%s cannot be loaded in %s: %s" % (version.ref, environment.name, link.error),
                                "Run cachectl show %s for details." % version.ref)
        converted = self.store.get_converted(link.converted)
        return Resolved(version, environment.name, converted, self.store.converted_path(converted))

    def pin(self, ref: str, env: str) -> Version:
        environment = self.env(env)
        version = self.find_version(ref)
        with self.store.lock("pins:" + environment.name):
            pins = self.store.pins_of(environment.name)
            pins[version.name] = version.version
            self.store.put_pins(environment.name, pins)
        self.convert_for(version.source, environment)
        self.refresh_views([environment.name])
        return version

    def unpin(self, name: str, env: str) -> bool:
        environment = self.env(env)
        with self.store.lock("pins:" + environment.name):
            pins = self.store.pins_of(environment.name)
            removed = pins.pop(name.partition("@")[0], None) is not None
            self.store.put_pins(environment.name, pins)
        if removed:
            self.refresh_views([environment.name])
        return removed

    # -- listing ---------------------------------------------------------------------------

    def scan(self) -> Snapshot:
        """Everything the store holds, read once; what could not be read is in its warnings."""
        from .scan import scan

        return scan(self.store)

    def rows(self, env: str | None = None, snapshot: Snapshot | None = None) -> list[Row]:
        """One row per version, by name then version; with `env`, as that environment sees it
        (its copies, its pins)."""
        snap = snapshot or self.scan()
        sources, converted = snap.sources, snap.converted
        envs = [e for e in self._with_default(snap.envs) if env is None or e.name == env]
        if env is not None and not envs:
            self.env(env)  # raises the helpful error
        # the fields the rows read, as columns (not 10,000 values each of the versions, the
        # links and the sources); each field of the rows is made as a column too, its lookups
        # in C (map), and the rows from those columns: half the time of a loop making each row
        links: dict[str, dict[str, int]] = {e.name: {} for e in envs}  # env -> source -> its link's place
        for at, (link_env, source) in enumerate(zip(snap.links.column("env"), snap.links.column("source"))):
            if link_env in links:
                links[link_env][source] = at
        env_links = [(e.name, e.timm, links[e.name]) for e in envs]
        link_timm, link_error = snap.links.column("timm"), snap.links.column("error")
        link_converted = snap.links.column("converted")
        pinned_in: dict[tuple[str, int], list[str]] = {}  # (name, version) -> the environments pinning it
        for e in sorted(e.name for e in envs):
            for name, version in snap.pins.get(e, {}).items():
                pinned_in.setdefault((name, version), []).append(e)
        sizes = snap.converted_size()
        served = self._served_by_version([e.name for e in envs], snap)
        architecture, made_by = sources.column("architecture"), sources.column("timm_versions")
        source_size, source_error = sources.column("size"), sources.column("error")
        converted_ids = set(converted)
        versions = snap.versions  # by name, then version: so are the rows
        names, numbers, shas = versions.column("name"), versions.column("version"), versions.column("source")
        have_in, error_of, state_of = [], [], []
        for sha, error in zip(shas, map(source_error.get, shas)):
            have, errors, waiting = [], [], False
            for env_name, timm, of_env in env_links:
                at = of_env.get(sha)
                if at is None or link_timm[at] != timm:
                    waiting = True
                elif link_error[at]:
                    errors.append("%s: %s" % (env_name, link_error[at]))
                elif link_converted[at] in converted_ids:
                    have.append(env_name)
            error = error or ("; ".join(errors) or None)
            have_in.append(tuple(have))
            error_of.append(error)
            state_of.append("failed" if error else (self._waiting_state(sha, envs) if waiting else "ready"))
        none = repeat(())
        return list(map(  # in Row's field order
            Row, names, numbers, map(architecture.get, shas),
            map(made_by.get, shas, none), map(source_size.get, shas, repeat(0)), map(sizes.get, shas, repeat(0)),
            have_in, [tuple(pinned_in.get(nv, ())) for nv in zip(names, numbers)] if pinned_in else none,
            versions.column("added"), state_of, error_of, shas,
            [tuple(served.get("%s@%d" % nv, ())) for nv in zip(names, numbers)] if served else none))

    def _waiting_state(self, sha: str, envs: list[Environment]) -> str:
        """`converting` while a process holds a conversion of `sha`; else `pending`: it
        converts when first asked for (path, load_state_dict) or by the daemon."""
        try:
            busy = any(self.store.is_locked("convert:%s:%s" % (sha, e.name)) for e in envs)
        except OSError:  # a reader without write access cannot probe locks
            return "pending"
        return "converting" if busy else "pending"

    def _with_default(self, envs: tuple[Environment, ...]) -> list[Environment]:
        return list(envs) if any(e.name == DEFAULT_ENV for e in envs) else self.known_environments()

    def known_environments(self) -> list[Environment]:
        """The registered environments, and the default one before its first use registers it:
        as it will be, its timm and torch read from their package metadata, not imported
        (torch's import is most of a second: `list` on a new store must not pay it).
        Never written: registering asks the interpreter itself (`environments`)."""
        envs = {e.name: e for e in self.store.all_envs()}
        if DEFAULT_ENV not in envs:
            from .inspection import installed_release

            timm, torch = installed_release("timm"), installed_release("torch")
            if timm is None or torch is None:
                return self.environments()  # the metadata cannot tell: ask timm
            envs[DEFAULT_ENV] = Environment(name=DEFAULT_ENV, python=None, timm=timm, torch=torch.split("+")[0],
                                            probed=0.0)
        return [envs[k] for k in sorted(envs)]

    @staticmethod
    def _served_by_version(envs: list[str], snap: Snapshot) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for env in envs:
            for s in snap.views.get(env, {}).get("served", []):
                out.setdefault(s["version"], []).append("%s in %s" % (s["pretrained"], env))
        return out

    def show(self, ref: str, snapshot: Snapshot | None = None) -> dict:
        """Everything about one version; an environment without a copy yet is `pending`."""
        snap = snapshot or self.scan()
        version = self.find_version(ref)
        source = snap.sources.get(version.source)
        envs = self._with_default(snap.envs)
        links = {snap.links[i].env: snap.links[i]
                 for i, source in enumerate(snap.links.column("source")) if source == version.source}
        out = {
            "name": version.name, "version": version.ref, "added": version.added, "origin": version.origin,
            "source": dataclasses.asdict(source) if source else None, "blob": str(self.store.blob_path(version.source)),
            "environments": {},
            "served": self._served_by_version([e.name for e in envs], snap).get(version.ref, []),
        }
        for e in envs:
            l = links.get(e.name)
            c = snap.converted.get(l.converted) if l and l.converted else None
            state = "pending" if l is None or l.timm != e.timm else ("failed" if l.error else "ready")
            out["environments"][e.name] = {
                "timm": e.timm, "state": state, "error": l.error if l and state == "failed" else None,
                "converted": _converted_json(c) if c and state == "ready" else None,
                "path": str(self.store.converted_path(c)) if c and state == "ready" else None,
            }
        return out

    # -- verify ------------------------------------------------------------------------------

    def verify(self, refs: list[str] | None = None,
               progress: Callable[[str], None] | None = None) -> list[str]:
        """Problems found: damaged blobs, and converted files that no longer load strictly."""
        from .convert import strict_check
        from .reader import read

        snap = self.scan()
        problems = list(snap.warnings)
        versions = [self.find_version(r) for r in refs] if refs else snap.versions
        shas = {v.source for v in versions}
        converted = [c for c in snap.converted.values() if c.source in shas]
        for sha in sorted(shas):
            if progress:
                progress(sha)
            problems += self._check_blob(self.store.blob_path(sha), sha, "source of %s" % ", ".join(v.ref for v in versions if v.source == sha))
        envs = {e.name: e for e in self.environments()}
        for c in converted:
            found = self._check_converted(c, self.store.converted_path(c), "converted %s" % c.id)
            problems += found
            if found:
                continue  # a damaged file is damaged: whether it loads says no more
            for link in snap.links:
                if link.converted != c.id or link.env not in envs or link.timm != envs[link.env].timm:
                    continue
                spec = self.target(envs[link.env]).describe(c.model, c.model_kwargs)
                path = self.store.converted_path(c)
                written = read(path)
                mismatch = strict_check(written.tensors, spec.layout, written.layout)
                if not mismatch.ok:
                    problems.append("%s: no longer loads strictly into %s in %s: %s" % (
                        path, c.model, link.env, mismatch.describe()))
        return problems

    def _check_blob(self, path: Path, sha: str, what: str) -> list[str]:
        if not path.exists():
            return ["%s (%s): missing" % (path, what)]
        actual = sha256_file(path)
        return [] if actual == sha else ["%s (%s): damaged, its sha256 is now %s" % (path, what, actual)]

    def _check_converted(self, c: Converted, path: Path, what: str) -> list[str]:
        """`path`, the file of `c` or its torch-format copy, checked against its name."""
        if not path.name.endswith(CONVERTED_SUFFIX):
            return self._check_blob(path, c.torch_sha256 or "", what)
        if c.recipe is not None:
            return self._check_recipe(c, path, what)
        return self._check_blob(path, c.sha256, what)

    def _check_recipe(self, c: Converted, path: Path, what: str) -> list[str]:
        """A converted file named by its recipe, compared with its source; only when they
        differ is the source's own sha256 read, to say which of the two is damaged."""
        from .safetensors_io import Recipe, check_recipe

        source = self.store.blob_path(c.source)
        if not path.exists():
            return ["%s (%s): missing" % (path, what)]
        manifest = self.store.converted / ("%s.json" % c.id)
        try:
            recipe = Recipe.from_json(c.recipe)
            if recipe.name(c.source) != c.sha256:
                raise ValueError("it does not give the file's name")
        except ValueError as exc:
            return ["%s: the recipe of %s is damaged (%s); remove the manifest and the file is converted again "
                    "when next used" % (manifest, path, exc)]
        if not source.exists():
            return ["%s (%s): cannot be checked while its source %s is missing" % (path, what, source)]
        wrong = check_recipe(path, recipe, source)
        if wrong is None:
            return []
        if sha256_file(source) != c.source:
            # its bytes may well be right: they were copied while the source was whole
            return ["%s (%s): cannot be checked while its source %s is damaged" % (path, what, source)]
        return ["%s (%s): damaged, %s" % (path, what, wrong)]

    # -- views ---------------------------------------------------------------------------------

    def refresh_views(self, envs: list[str] | None = None,
                      progress: Callable[[str], None] | None = None) -> list[ViewPlan]:
        """Bring the views of `envs` (default: all) in line with names, pins and publications.

        Converts, for each environment, what its view should serve and is not converted yet."""
        from . import views

        plans = []
        # read once for every environment: names and the sources they need, not per view
        versions = self.store.all_versions()
        sources: dict[str, Source | None] = {}
        for env in self.environments():
            if envs is not None and env.name not in envs:
                continue
            with self.store.lock("view:" + env.name):
                entries, failed = self._view_entries(env, progress, versions, sources)
                target = self.target(env)
                before = views.read(self.store, env.name) or {}
                # proven by an earlier build for this timm: the check is not repeated
                proven = {(s["pretrained"], s["converted"], s["blob"]) for s in before.get("served", [])
                          if before.get("timm") == env.timm}

                def blob_of(c: Converted, torch_format: bool) -> str:
                    return self._blob_of(c, torch_format, env)

                def check(name: str, c: Converted, torch_format: bool) -> str | None:
                    if (name, c.id, blob_of(c, torch_format)) in proven:
                        return None
                    return self._loader_changes(env, name, c, self.store.blobs / blob_of(c, torch_format), torch_format)

                view = views.plan(env.name, env.timm, env.hub, entries, self.catalog, target.pretrained_cfg, blob_of, check)
                view = dataclasses.replace(view, skipped=view.skipped + tuple(failed))
                views.apply(self.store, view)
            plans.append(view)
        return plans

    def _touches_views(self, version: Version) -> bool:
        """Whether a new `version` can change what a view serves: it names a pretrained
        model, its name is published, or an older version of its name is served."""
        from . import views

        if self._pretrained_keys(version) or any(p.name == version.name for p in self.store.all_publications()):
            return True
        prefix = version.name + "@"
        for env in self.store.all_envs():
            served = (views.read(self.store, env.name) or {}).get("served", [])
            if any(s["version"].startswith(prefix) for s in served):
                return True
        return False

    def _view_entries(self, env: Environment, progress: Callable[[str], None] | None, versions: list[Version],
                      sources: dict[str, Source | None]) -> tuple[list[Entry], list[Skipped]]:
        from . import pretrained
        from .views import Entry, Skipped

        publications = [p for p in self.store.all_publications() if p.env in (None, env.name)]
        wanted: list[tuple[Version, frozenset[str], str | None]] = []
        for v in self._needed_versions(env, versions):
            keys = self._pretrained_keys(v, sources)
            if keys:
                wanted.append((v, keys, None))
            for p in publications:
                if p.name == v.name and p.version is None:
                    wanted.append((v, pretrained.published(self.catalog, p.as_name), p.as_name))
        for p in publications:
            if p.version is not None:
                try:
                    v = self.find_version("%s@%d" % (p.name, p.version))
                except CachectlError:
                    continue  # pruned or removed since: nothing to serve
                wanted.append((v, pretrained.published(self.catalog, p.as_name), p.as_name))
        entries, failed = [], []
        for v, keys, as_name in wanted:
            if progress:
                progress("%s for %s" % (v.ref, env.name))
            link = self.convert_for(v.source, env)
            converted = self.store.get_converted(link.converted) if link.converted else None
            if converted is None:
                failed.append(Skipped(as_name or "(its pretrained names)", v.ref, link.error or "not converted"))
                continue
            entries.append(Entry(v.ref, converted, keys, v.added, as_name))
        return entries, failed

    def _pretrained_keys(self, v: Version, sources: dict[str, Source | None] | None = None) -> frozenset[str]:
        """What `v` is by itself: the hub repo it came from, or a pretrained URL's file name.
        `sources`: those read so far, filled as it goes."""
        from . import pretrained

        if sources is None:
            sources = {}
        if v.source not in sources:
            sources[v.source] = self.store.get_source(v.source)
        source = sources[v.source]
        if source is None or not source.architecture:
            return frozenset()
        origin = Path(v.origin)
        repo_id = next((p[len("models--"):].replace("--", "/") for p in reversed(origin.parts)
                        if p.startswith("models--")), None)
        return pretrained.identity(self.catalog, source.architecture, None if repo_id else origin.name, repo_id)

    def _blob_of(self, c: Converted, torch_format: bool, env: Environment) -> str:
        """The blob of `c` a view links to; the torch-format copy is made the first time."""
        path = self.store.converted_path(c)
        if torch_format:
            path = self.store.torch_path(c)
            if path is None or not path.exists():
                path = self._torch_copy(c, self.target(env).describe(c.model, c.model_kwargs).layout.keys)
        return str(path.relative_to(self.store.blobs))

    def _loader_changes(self, env: Environment, name: str, c: Converted, path: Path, torch_format: bool) -> str | None:
        """Why `env`'s own pretrained loader would not load `path` unchanged as `name`; None if it would."""
        import torch

        from .errors import TargetError
        from .reader import read

        target = self.target(env)
        tensors = dict(read(path).tensors)
        try:
            spec = target.describe(name if target.pretrained_cfg(name) else c.model, c.model_kwargs)
            out, how = target.apply_filter(spec, tensors, ordered=torch_format)
        except TargetError as exc:
            return "timm %s's own loader fails on it: %s" % (env.timm, exc)
        if out is None:
            return None
        if set(out) != set(tensors) or any(not torch.equal(out[k], tensors[k]) for k in tensors):
            return "timm %s's checkpoint filter %s changes it on loading" % (env.timm, how)
        return None

    def _torch_copy(self, c: Converted, order: tuple[str, ...]) -> Path:
        import torch
        from safetensors.torch import load_file

        with self.store.lock("converted:" + c.id):
            c = self.store.get_converted(c.id) or c
            path = self.store.torch_path(c)
            if path is not None and path.exists():
                return path
            tmp = self.store.new_tmp(TORCH_SUFFIX)
            try:
                state = load_file(self.store.converted_path(c))
                # the model's own order, as torch.save of its state_dict would have it
                rank = {k: i for i, k in enumerate(order)}
                torch.save({k: state[k] for k in sorted(state, key=lambda k: rank.get(k, len(rank)))}, tmp)
                digest, _ = self.store.publish_blob(tmp, TORCH_SUFFIX)
            finally:
                tmp.unlink(missing_ok=True)
            self.store.put_converted(dataclasses.replace(c, torch_sha256=digest))
            return self.store.blob_path(digest, TORCH_SUFFIX)

    def publish(self, ref: str, as_name: str, env: str | None = None) -> Publication:
        """Serve `ref` as the pretrained name `as_name` in `env`'s view (every view: None)."""
        name, _, wanted = ref.partition("@")
        version = self.find_version(ref)
        if env is not None:
            self.env(env)
        if not as_name or as_name.startswith(".") or as_name.count("/") > 1 or any(c.isspace() for c in as_name):
            raise CachectlError(None, "%r is not a pretrained name" % as_name,
                                "Give ARCH.TAG (resnet50.my_finetune), or a hub repo id (myteam/resnet50_ft).")
        publication = Publication(version.name, as_name, version.version if wanted else None, env)
        with self.store.lock("publications"):
            kept = [p for p in self.store.all_publications() if (p.as_name, p.env) != (as_name, env)]
            self.store.put_publications(kept + [publication])
        return publication

    def unpublish(self, as_name: str, env: str | None = None) -> list[Publication]:
        with self.store.lock("publications"):
            publications = self.store.all_publications()
            gone = [p for p in publications if p.as_name == as_name and (env is None or p.env == env)]
            if not gone:
                raise CachectlError(None, "nothing is published as %s%s" % (as_name, " in %s" % env if env else ""),
                                    "See cachectl views list.")
            self.store.put_publications([p for p in publications if p not in gone])
        return gone

    def verify_views(self, envs: list[str] | None = None) -> list[str]:
        """Problems of the views: links that do not resolve, linked files that are not the
        converted file they claim to be, served files that no longer load strictly."""
        from . import views
        from .convert import strict_check
        from .reader import read

        problems = []
        for env in self.environments():
            if envs is not None and env.name not in envs:
                continue
            problems += views.broken_links(self.store, env.name)
            for s in (views.read(self.store, env.name) or {}).get("served", []):
                c = self.store.get_converted(s["converted"])
                blob = self.store.blobs / s["blob"]
                if c is None:
                    problems.append("view %s: %s names converted file %s, which the store no longer has" % (
                        env.name, s["pretrained"], s["converted"]))
                    continue
                found = self._check_converted(c, blob, "%s in the view of %s" % (s["pretrained"], env.name))
                problems += found
                if found:
                    continue  # a damaged file is damaged: whether it loads says no more
                spec = self.target(env).describe(c.model, c.model_kwargs)
                written = read(blob)
                mismatch = strict_check(written.tensors, spec.layout, written.layout)
                if not mismatch.ok:
                    problems.append("view %s: %s (%s) no longer loads strictly into %s: %s" % (
                        env.name, s["pretrained"], blob, c.model, mismatch.describe()))
        return problems


def _converted_json(c: Converted) -> dict:
    """A converted entry as `show --json` gives it: `sha256` is the file's own or null."""
    out = dataclasses.asdict(c)
    if c.recipe:
        # named by its recipe, never hashed (README: "A converted file is named by its
        # recipe"): its sha256 is not known here, and the recipe's name is not it
        out["recipe_name"], out["sha256"] = out["sha256"], None
    return out
