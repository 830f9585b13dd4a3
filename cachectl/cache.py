"""What the cache does: ingest, convert per environment, resolve names, list, pin, verify.

The CLI, the daemon and the Python API all go through `Cache`; `Store` only persists.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import CachectlError
from .paths import default_root
from .store import CONVERTED_SUFFIX, Converted, Environment, Link, Source, Store, Version, sha256_file

# torch loads with these, so only the commands that convert or read weights import them:
# listing, pinning and pruning stay quick
if TYPE_CHECKING:
    from .catalog import Catalog
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
    size: int  # the source blob and every converted blob of it
    environments: tuple[str, ...]  # environments with a converted copy
    pinned: tuple[str, ...]  # environments pinning this version
    created: float
    state: str  # ready | converting | failed
    error: str | None
    source: str  # sha256

    @property
    def ref(self) -> str:
        return "%s@%d" % (self.name, self.version)

    def to_json(self) -> dict:
        return {
            "name": self.name, "version": self.ref, "architecture": self.architecture,
            "timm_versions": list(self.timm_versions), "size": self.size,
            "environments": list(self.environments), "pinned": list(self.pinned),
            "state": self.state, "error": self.error, "created": self.created, "sha256": self.source,
        }


@dataclass(frozen=True)
class Resolved:
    version: Version
    env: str
    converted: Converted
    path: Path


class Cache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.store = Store(root or default_root()).init()
        self._targets: dict[str, Target] = {}
        self._catalog: Catalog | None = None

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
        if self._catalog is None:
            from .catalog import Catalog

            self._catalog = Catalog.load()
        return self._catalog

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

    def _probe(self, name: str, python: str | None) -> Environment:
        # a fresh agent: a running one keeps the timm it imported before an upgrade
        from .target import Target

        if name in self._targets:
            self._targets.pop(name).close()
        target = self._targets[name] = Target(python)
        info = target.info()
        return Environment(name=name, python=target.python, timm=info.timm, torch=info.torch, probed=time.time())

    def env_add(self, name: str, python: str) -> Environment:
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise CachectlError(None, "environment name %r has characters other than letters, digits, - _ ." % name,
                                "Choose a name like timm06 or prod-1.")
        if self.store.get_env(name):
            raise CachectlError(None, "environment %s exists" % name, "Use cachectl env refresh %s, or env rm it first." % name)
        env = self._probe(name, python)
        self.store.put_env(env)
        return env

    def env_rm(self, name: str) -> None:
        self.env(name)
        if name == DEFAULT_ENV:
            raise CachectlError(None, "the default environment is the interpreter cachectl runs in",
                                "It cannot be removed; register other environments with cachectl env add.")
        self.store.remove_env(name)

    def env_refresh(self, name: str, progress: Callable[[str], None] | None = None) -> tuple[Environment, Environment]:
        """Re-probe `name`; when its timm changed, convert what its names need for the new one."""
        old = self.env(name)
        new = self._probe(name, old.python)
        self.store.put_env(new)
        if new.timm != old.timm:
            for sha in {v.source for v in self._needed_versions(new)}:
                if progress:
                    progress(sha)
                self.convert_for(sha, new)
        return old, new

    def _needed_versions(self, env: Environment) -> list[Version]:
        """The version each name resolves to in `env`: its pin, else the newest."""
        pins = self.store.pins_of(env.name)
        newest: dict[str, Version] = {}
        out = []
        for v in self.store.all_versions():
            if pins.get(v.name) == v.version:
                out.append(v)
            elif v.name not in pins and (v.name not in newest or v.version > newest[v.name].version):
                newest[v.name] = v
        return out + list(newest.values())

    # -- ingest and convert --------------------------------------------------------------

    def add(self, path: str | os.PathLike, name: str | None = None,
            progress: Callable[[str], None] | None = None) -> AddResult:
        """Ingest `path` as a new version of `name` and convert it for every environment."""
        from .reader import read

        path = Path(path)
        name = name or name_from_path(path)
        ckpt = read(path)  # unreadable files are refused before anything is stored
        sha, size = self.store.ingest_file(ckpt.weights)
        source = self.store.get_source(sha)
        if source is None:
            source = self._identify(ckpt, sha, size)
            self.store.put_source(source)
        version, is_new = self._new_version(name, sha, str(path.absolute()))
        links = []
        for env in self.environments():
            if progress:
                progress(env.name)
            links.append(self.convert_for(sha, env, ckpt))
        return AddResult(version, source, is_new, tuple(links))

    def _identify(self, ckpt: Checkpoint, sha: str, size: int) -> Source:
        from .identify import identify

        base = dict(sha256=sha, size=size, origin=str(ckpt.path.absolute()), added=time.time(), format=ckpt.format)
        try:
            tag = identify(ckpt, self.catalog)
        except CachectlError as exc:
            return Source(**base, error=str(exc))
        b = tag.best
        return Source(**base, architecture=b.architecture, timm_versions=b.timm_versions,
                      confidence=b.confidence, num_classes=b.num_classes)

    def _new_version(self, name: str, sha: str, origin: str) -> tuple[Version, bool]:
        with self.store.lock("name:" + name):
            versions = self.store.versions(name)
            if versions and versions[-1].source == sha:
                return versions[-1], False
            v = Version(name, (versions[-1].version + 1) if versions else 1, sha, time.time(), origin)
            self.store.put_versions(name, versions + [v])
            return v, True

    def convert_for(self, sha: str, env: Environment, ckpt: Checkpoint | None = None) -> Link:
        """The link from `env` to its converted copy of source `sha`, converting at most once."""
        with self.store.lock("convert:%s:%s" % (sha, env.name)):
            link = self.store.get_link(env.name, sha)
            if link and link.timm == env.timm and (link.error or self._converted_ok(link.converted)):
                return link
            source = self.store.get_source(sha)
            if source is None:
                raise CachectlError(None, "no source %s in the store" % sha[:12], "Add the file again with cachectl add.")
            if source.error:
                link = Link(env.name, sha, env.timm, None, source.error, time.time())
            else:
                link = self._convert(source, env, ckpt)
            self.store.put_link(link)
            return link

    def _converted_ok(self, cid: str | None) -> bool:
        c = self.store.get_converted(cid) if cid else None
        return c is not None and self.store.converted_path(c).exists()

    def _convert(self, source: Source, env: Environment, ckpt: Checkpoint | None) -> Link:
        from .convert import prepare, write_prepared
        from .reader import read

        try:
            if ckpt is None:
                ckpt = dataclasses.replace(read(self.store.blob_path(source.sha256)), path=Path(source.origin))
            prepared = prepare(ckpt, self.target(env), catalog=self.catalog)
            cid = "%s-%s" % (source.sha256[:16], prepared.target_layout)
            with self.store.lock("converted:" + cid):
                if not self._converted_ok(cid):
                    tmp = self.store.new_tmp(".safetensors")
                    try:
                        result = write_prepared(prepared, tmp, source.sha256)
                        digest, size = self.store.publish_blob(tmp, CONVERTED_SUFFIX)
                    finally:
                        tmp.unlink(missing_ok=True)
                    self.store.put_converted(Converted(
                        id=cid, source=source.sha256, target_layout=prepared.target_layout,
                        target_timm=prepared.target_timm, model=result.model.name,
                        model_kwargs=dict(result.model.kwargs), sha256=digest, size=size,
                        created=time.time(), steps=result.steps,
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
        link = self.convert_for(version.source, environment)
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
        return version

    def unpin(self, name: str, env: str) -> bool:
        environment = self.env(env)
        with self.store.lock("pins:" + environment.name):
            pins = self.store.pins_of(environment.name)
            removed = pins.pop(name.partition("@")[0], None) is not None
            self.store.put_pins(environment.name, pins)
        return removed

    # -- listing ---------------------------------------------------------------------------

    def rows(self, env: str | None = None) -> list[Row]:
        sources = self.store.all_sources()
        converted = self.store.all_converted()
        envs = [e for e in self.environments() if env is None or e.name == env]
        if env is not None and not envs:
            self.env(env)  # raises the helpful error
        links: dict[tuple[str, str], Link] = {(l.env, l.source): l for l in self.store.all_links()}
        pins = self.store.all_pins()
        sizes: dict[str, int] = {}
        for c in converted.values():
            sizes[c.source] = sizes.get(c.source, 0) + c.size
        rows = []
        for v in self.store.all_versions():
            s = sources.get(v.source)
            have, errors, waiting = [], [], False
            for e in envs:
                link = links.get((e.name, v.source))
                if link is None or link.timm != e.timm:
                    waiting = True
                elif link.error:
                    errors.append("%s: %s" % (e.name, link.error))
                elif link.converted in converted:
                    have.append(e.name)
            error = s.error if s and s.error else ("; ".join(errors) or None)
            state = "failed" if error else ("converting" if waiting else "ready")
            rows.append(Row(
                name=v.name, version=v.version, architecture=s.architecture if s else None,
                timm_versions=s.timm_versions if s else (), size=(s.size if s else 0) + sizes.get(v.source, 0),
                environments=tuple(have), pinned=tuple(sorted(e for e, p in pins.items() if p.get(v.name) == v.version)),
                created=v.added, state=state, error=error, source=v.source,
            ))
        rows.sort(key=lambda r: (r.name, r.version))
        return rows

    def show(self, ref: str) -> dict:
        version = self.find_version(ref)
        source = self.store.get_source(version.source)
        links = [l for l in self.store.all_links() if l.source == version.source]
        out = {
            "name": version.name, "version": version.ref, "added": version.added, "origin": version.origin,
            "source": dataclasses.asdict(source) if source else None, "blob": str(self.store.blob_path(version.source)),
            "environments": {},
        }
        for l in links:
            c = self.store.get_converted(l.converted) if l.converted else None
            out["environments"][l.env] = {
                "timm": l.timm, "error": l.error,
                "converted": dataclasses.asdict(c) if c else None,
                "path": str(self.store.converted_path(c)) if c else None,
            }
        return out

    # -- verify ------------------------------------------------------------------------------

    def verify(self, refs: list[str] | None = None,
               progress: Callable[[str], None] | None = None) -> list[str]:
        """Problems found: damaged blobs, and converted files that no longer load strictly."""
        from .convert import strict_check
        from .reader import read

        problems = []
        versions = [self.find_version(r) for r in refs] if refs else self.store.all_versions()
        shas = {v.source for v in versions}
        converted = [c for c in self.store.all_converted().values() if c.source in shas]
        for sha in sorted(shas):
            if progress:
                progress(sha)
            problems += self._check_blob(self.store.blob_path(sha), sha, "source of %s" % ", ".join(v.ref for v in versions if v.source == sha))
        envs = {e.name: e for e in self.environments()}
        for c in converted:
            problems += self._check_blob(self.store.converted_path(c), c.sha256, "converted %s" % c.id)
            for link in self.store.all_links():
                if link.converted != c.id or link.env not in envs or link.timm != envs[link.env].timm:
                    continue
                spec = self.target(envs[link.env]).describe(c.model, c.model_kwargs)
                path = self.store.converted_path(c)
                if path.exists():
                    mismatch = strict_check(read(path).tensors, spec.layout)
                    if not mismatch.ok:
                        problems.append("%s: no longer loads strictly into %s in %s: %s" % (
                            path, c.model, link.env, mismatch.describe()))
        return problems

    def _check_blob(self, path: Path, sha: str, what: str) -> list[str]:
        if not path.exists():
            return ["%s (%s): missing" % (path, what)]
        actual = sha256_file(path)
        return [] if actual == sha else ["%s (%s): damaged, its sha256 is now %s" % (path, what, actual)]
