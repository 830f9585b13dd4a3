"""The store on disk: the filesystem is the database.

    <root>/store-v1/blobs/sha256/ab/<sha256>        immutable files, named by content (or recipe)
    <root>/store-v1/sources/<sha256>.json            one manifest per ingested checkpoint
    <root>/store-v1/converted/<id>.json              one manifest per converted file
    <root>/store-v1/names/<name>.json                the versions of a name
    <root>/store-v1/links/<env>/<sha256>.json        which converted file an environment loads
    <root>/envs/<env>.json                           registered environments
    <root>/pins/<env>.json                           pins of an environment
    <root>/locks/                                    lock files
    <root>/CACHEDIR.TAG                              "a cache": backup tools skip it

Every write goes to a hidden temporary in the destination folder, is fsynced and
renamed into place, so readers never see half a file and a killed writer leaves only
a `.tmp` that `cachectl prune` removes once its writer is gone (tempnames.py: the
name says which host and process writes it). The layout's version is in the folder name; every
JSON file says the format it needs (`"format": 1`, or 2 for a converted file named by its
recipe, which an older cachectl would find "damaged" if it read it as named by content): a
future layout gets a new folder and this one stays readable; a file of a newer format is
reported, never misread.

A converted file written from a source is named by its recipe (safetensors_io.Recipe: the
source's sha256, the header and where each run of bytes comes from), not by the sha256 of
its bytes: that hash cost as much as the copy itself. Its manifest keeps the name in
`sha256`, so whatever finds blobs by that field (prune, views) reads both kinds alike, and
the recipe beside it, which `verify` checks against the source.

Shared by a group: the root's permissions are the store's. Under a root that is setgid
and group-writable (`chgrp G ROOT; chmod 2775 ROOT`, or `cachectl init --group G`),
every folder is made group-writable and inherits the group, every file group-readable
and every lock file group-writable, whatever the writer's umask; a root private to its
owner keeps everything private.
"""
from __future__ import annotations

import errno
import json
import os
import stat
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

from . import locks
from .errors import CachectlError, NoSpaceError
from .regular import open_regular
from .tempnames import temp_name, temp_path
from .writeback import Writeback

# hashlib and shutil (with the compressors it imports) are imported where a file is hashed
# or a folder removed: a fifth of the start-up of `list`, which does neither

LAYOUT = 1  # the folders: store-v1
BASE_FORMAT = 1  # what every file needs, but a converted manifest named by its recipe
RECIPE_FORMAT = 2
FORMAT = RECIPE_FORMAT  # the newest file format this cachectl reads
TAG_NAME = "CACHEDIR.TAG"
# https://bford.info/cachedir/: the signature line is what backup tools look for
TAG = "Signature: 8a477f597d28d172789f06886806bc55\n# A cachectl store: converted timm checkpoints, remade on demand.\n"
CONVERTED_SUFFIX = ".safetensors"
TORCH_SUFFIX = ".pth"  # timm before 0.9 reads pretrained weights with torch.load only
CHUNK = 8 * 1024 * 1024
# A soft lock is a lease its holder renews while it lives (a heartbeat thread): one whose
# holder died, on any host, is taken over this long after its last renewal. Every process
# on the store must use the same duration.
LEASE_SECONDS = 60.0


@dataclass(frozen=True)
class Source:
    sha256: str
    size: int
    origin: str  # the path it was first ingested from
    added: float
    format: str | None = None
    architecture: str | None = None
    timm_versions: tuple[str, ...] = ()
    confidence: str | None = None
    num_classes: int | None = None
    error: str | None = None  # why it could not be read or identified
    model: str | None = None  # what the user said the file is (`add --model`), if anything
    prefixes: tuple[str, ...] = ()  # where the user said its timm models are (`add --prefix`)
    source_timm: str | None = None  # the release the user said saved it (`add --source-timm`)


@dataclass(frozen=True)
class Converted:
    id: str  # <source sha256[:16]>-<target layout id>
    source: str
    target_layout: str
    target_timm: str
    model: str
    model_kwargs: dict = field(hash=False)
    sha256: str
    size: int
    created: float
    steps: tuple[str, ...] = ()
    torch_sha256: str | None = None  # a torch-format copy, made for views of timm before 0.9
    # how the file is made of its source (safetensors_io.Recipe.as_json), when `sha256` is
    # the recipe's name; None: `sha256` is the file's own
    recipe: dict | None = field(default=None, hash=False)


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    source: str
    added: float
    origin: str

    @property
    def ref(self) -> str:
        return "%s@%d" % (self.name, self.version)


@dataclass(frozen=True)
class Link:
    """Environment `env` loads `converted` for `source`, or failed to, with `error`."""

    env: str
    source: str
    timm: str  # the env's timm when this was decided: another timm invalidates it
    converted: str | None
    error: str | None
    updated: float


@dataclass(frozen=True)
class Environment:
    name: str
    python: str | None  # None: the interpreter cachectl runs in
    timm: str
    torch: str
    probed: float
    hub: bool = True  # its timm can import its huggingface_hub (timm reads the hub cache through it)


@dataclass(frozen=True)
class Publication:
    """`name` (at `version`, else its pin or newest) serves the pretrained name `as_name`."""

    name: str
    as_name: str  # arch.tag, an old untagged name, or a hub repo id
    version: int | None = None
    env: str | None = None  # None: every environment


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _to_json(value, fmt: int = BASE_FORMAT) -> dict:
    # shallow (the manifests are flat): asdict's deep copy of a recipe's runs cost 1.4 ms a conversion
    raw = {f.name: getattr(value, f.name) for f in fields(value)}
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in raw.items()}, "format": fmt}


def _fields(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if k != "format"}


@dataclass(frozen=True)
class Modes:
    """Permission bits of what the store makes, taken from its root's."""

    folder: int
    file: int
    blob: int
    lock: int  # writable by whoever may write the store: a lock is taken by opening it for writing

    @classmethod
    def of_root(cls, st_mode: int) -> "Modes":
        perm = st_mode & 0o777
        read, write = perm & 0o044, perm & 0o022
        return cls(folder=perm | 0o700, file=0o600 | read, blob=0o400 | read, lock=0o600 | read | write)


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self.base = self.root / ("store-v%d" % LAYOUT)
        self.blobs = self.base / "blobs" / "sha256"
        self.sources = self.base / "sources"
        self.converted = self.base / "converted"
        self.names = self.base / "names"
        self.links = self.base / "links"
        self.envs = self.root / "envs"
        self.pins = self.root / "pins"
        self.locks = self.root / "locks"
        self.inbox = self.root / "inbox"
        self.publications = self.root / "publications.json"
        self._modes: Modes | None = None
        self._locking: locks.LockChoice | None = None

    def is_store(self) -> bool:
        """A store's root: it has its tag, or the folder of a store made before tags."""
        return (self.root / TAG_NAME).is_file() or self.base.is_dir()

    def init(self, create: bool = True, group: str | None = None) -> "Store":
        """Make the store's folders; refuse a folder that is something else.

        `create` False: an absent root is refused too (a typo'd --root must not quietly
        become a new, empty store). An empty folder is taken: it was made for the store.
        `group`: share the store with that group (its root setgid, group-writable)."""
        if not self.root.exists():
            if not create:
                raise CachectlError(self.root, "does not exist", "Check --root and CACHECTL_ROOT; to make a new store "
                                    "there: cachectl --root %s init, or start the daemon on it: cachectld --root %s."
                                    % (self.root, self.root))
        elif not self.root.is_dir() or (not self.is_store() and any(self.root.iterdir())):
            raise CachectlError(self.root, "is not a cachectl store (it holds other files)",
                                "Check --root and CACHECTL_ROOT; a new store needs an empty or absent folder.")
        if group is not None:
            self._share(group)
        try:
            for d in (self.blobs, self.sources, self.converted, self.names, self.links, self.envs, self.pins,
                      self.locks):
                self.mkdir(d)
            if not (self.root / TAG_NAME).is_file():
                self._write(self.root / TAG_NAME, TAG.encode(), self.modes.file)
        except PermissionError:
            if not self.is_store():
                raise
            # a reader of a shared store: it reads what is there, missing folders read as empty
        return self

    def _share(self, group: str) -> None:
        import grp

        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise CachectlError(None, "there is no group %s" % group, "Create it (groupadd %s) or name another." % group)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chown(self.root, -1, gid)
        os.chmod(self.root, 0o2775)
        self._modes = None

    @property
    def modes(self) -> Modes:
        if self._modes is None:
            self._modes = Modes.of_root(self.root.stat().st_mode)
        return self._modes

    @property
    def locking(self) -> locks.LockChoice:
        """Kernel or soft locks, from CACHECTL_LOCKS or the store's mount."""
        if self._locking is None:
            self._locking = locks.choose(self.root)
        return self._locking

    def mkdir(self, path: Path) -> None:
        """`path` and its missing parents, with the root's permission bits whatever the umask;
        under a setgid root each folder inherits the bit and the group from its parent."""
        missing = []
        while not path.is_dir():
            missing.append(path)
            path = path.parent
        for p in reversed(missing):
            try:
                os.mkdir(p)
            except FileExistsError:
                continue
            if p == self.root or p in self.root.parents:
                continue  # the root's bits are the policy, not subject to it; its parents are not the store's
            mode = os.stat(p).st_mode
            if mode & 0o777 != self.modes.folder:
                try:
                    os.chmod(p, self.modes.folder | (mode & stat.S_ISGID))
                except PermissionError:
                    pass  # systemd's RestrictSUIDSGID refuses a mode naming setgid; its UMask then decides

    # -- atomic files ------------------------------------------------------------------

    def write_file(self, path: Path, data: bytes) -> None:
        """`data` in `path`, atomically, with the store's file mode."""
        self._write(path, data, self.modes.file)

    def write_json(self, path: Path, value) -> None:
        self._write(path, json.dumps(value, indent=1, sort_keys=True).encode(), self.modes.file)

    def _write(self, path: Path, data: bytes, mode: int) -> None:
        self.mkdir(path.parent)
        # a name no one can guess, created, never opened through a link someone planted
        tmp = temp_path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            with open(os.open(tmp, flags, 0o600), "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    def read_json(path: Path):
        """The JSON in `path`, None if there is none; damaged or newer-format: CachectlError."""
        try:
            with open(path, "rb") as f:
                raw = json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise CachectlError(path, "is damaged (%s)" % exc, "Run cachectl verify; remove the file if it says so.")
        if isinstance(raw, dict) and isinstance(raw.get("format"), int) and raw["format"] > FORMAT:
            raise CachectlError(path, "was written by a newer cachectl (format %d; this one reads %d)" % (
                raw["format"], FORMAT), "Use the newer cachectl on this store; this one leaves the file alone.")
        return raw

    @contextmanager
    def lock(self, name: str, wait: bool = True) -> Iterator[None]:
        """An exclusive lock that a crashed holder does not keep forever, usable by every
        member of a shared store's group. Held elsewhere and `wait` false: CachectlError."""
        self.mkdir(self.locks)
        path = self._lock_path(name)

        def busy() -> CachectlError:
            return CachectlError(None, "%s is busy (another cachectl holds it)" % name, "Try again in a moment.")
        fd = None
        if self.locking.kind == "kernel":
            try:
                fd = locks.flock(path, self.modes.lock, wait)
            except locks.Busy:
                raise busy() from None
        if fd is not None:
            try:
                yield
            finally:
                os.close(fd)
            return
        # soft: the mount keeps kernel locks to one host, or the filesystem refused flock
        import filelock  # 80 ms of CPU to import: only stores that need soft leases pay it

        lease = filelock.SoftFileLease(str(path), lease_duration=LEASE_SECONDS, timeout=-1 if wait else 0,
                                       mode=self.modes.lock, is_singleton=False)
        try:
            lease.acquire()
        except filelock.Timeout:
            raise busy() from None
        try:
            yield
        finally:
            lease.release()

    def _lock_path(self, name: str) -> Path:
        import hashlib

        return self.locks / ("%s.lock" % hashlib.sha1(name.encode()).hexdigest()[:20])

    @contextmanager
    def room(self, need: int) -> Iterator[None]:
        """Turn a full disk under the store into NoSpaceError: where, and about how much is needed."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            mount = self.root
            while not os.path.ismount(mount) and mount != mount.parent:
                mount = mount.parent
            raise NoSpaceError(None, "no space left on %s%s, need about %d MB" % (
                mount, " (your quota)" if exc.errno == errno.EDQUOT else "", -(-need // 10**6)),
                "Free space there (cachectl prune frees the cache's), then try again.") from None

    def is_locked(self, name: str) -> bool:
        if not self._lock_path(name).exists():
            return False  # never taken (a kernel lock's file stays; a soft one's goes with it)
        try:
            with self.lock(name, wait=False):
                return False
        except CachectlError:
            return True

    # -- blobs -------------------------------------------------------------------------

    def blob_path(self, sha256: str, suffix: str = "") -> Path:
        # converted files keep .safetensors: timm picks its loader by the file's suffix
        return self.blobs / sha256[:2] / (sha256 + suffix)

    def converted_path(self, c: "Converted") -> Path:
        return self.blob_path(c.sha256, CONVERTED_SUFFIX)

    def torch_path(self, c: "Converted") -> Path | None:
        return self.blob_path(c.torch_sha256, TORCH_SUFFIX) if c.torch_sha256 else None

    def ingest_file(self, path: Path) -> tuple[str, int]:
        """Copy `path` into the blobs, hashing as it goes; (sha256, size). Same bytes: no copy."""
        self.mkdir(self.blobs)
        tmp = self.blobs / temp_name("ingest")
        import hashlib

        h = hashlib.sha256()
        size = 0
        zero = bytes(CHUNK)
        try:
            # opened without blocking or following a planted link; read up to the size it
            # had when opened, so a file that keeps growing cannot keep this copy going
            with open(open_regular(path), "rb") as src, open(tmp, "wb") as dst:
                before = os.fstat(src.fileno())
                with Writeback(dst.fileno()) as disk:
                    while size < before.st_size and (block := src.read(min(CHUNK, before.st_size - size))):
                        h.update(block)
                        if block == zero[:len(block)]:
                            dst.seek(len(block), os.SEEK_CUR)  # a hole stays a hole: a sparse file is not made whole
                        else:
                            dst.write(block)  # larger than the buffer: it goes to the kernel now
                        size += len(block)
                        disk.reached(size)
                dst.truncate(size)
                after = os.fstat(src.fileno())
                if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                    raise CachectlError(path, "changed while it was read (its writer is not done)",
                                        "Wait until it is complete, then add it again.")
                dst.flush()
                os.fsync(dst.fileno())
            digest = h.hexdigest()
            final = self.blob_path(digest)
            if final.exists():
                tmp.unlink()
            else:
                self.mkdir(final.parent)
                # never readable by more people than the file it copies (a 0600 source stays private)
                os.chmod(tmp, self.modes.blob & ~(~before.st_mode & 0o044))
                os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return digest, size

    def publish_blob(self, tmp: Path, suffix: str = "", digest: str | None = None) -> tuple[str, int]:
        """Move a finished (fsynced) temporary file into the blobs under its name, and sync
        the folder it lands in. `digest`: its name, from its writer (its sha256 computed as it
        wrote, or its recipe's); by default its sha256, read here."""
        digest = digest or sha256_file(tmp)
        final = self.blob_path(digest, suffix)
        self.mkdir(final.parent)
        size = tmp.stat().st_size
        if final.exists():
            tmp.unlink()
        else:
            os.chmod(tmp, self.modes.blob)
            os.replace(tmp, final)
            fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return digest, size

    def link_blob(self, sha256: str, suffix: str) -> str:
        """The blob `sha256` also under `suffix` (a hard link: no byte copied); its sha256."""
        final = self.blob_path(sha256, suffix)
        if not final.exists():
            tmp = self.new_tmp(suffix)
            try:
                os.link(self.blob_path(sha256), tmp)
                os.replace(tmp, final)
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
        return sha256

    def new_tmp(self, suffix: str = "") -> Path:
        self.mkdir(self.blobs)
        return self.blobs / temp_name("new" + suffix)

    # -- manifests -------------------------------------------------------------------------

    def put_source(self, s: Source) -> None:
        # "format" is the store's format version in every file: the checkpoint's is apart
        self.write_json(self.sources / ("%s.json" % s.sha256), {**_to_json(s), "checkpoint_format": s.format})

    def get_source(self, sha256: str) -> Source | None:
        raw = self.read_json(self.sources / ("%s.json" % sha256))
        return _source(raw) if raw else None

    def put_converted(self, c: Converted) -> None:
        raw = _to_json(c, RECIPE_FORMAT) if c.recipe else {k: v for k, v in _to_json(c).items() if k != "recipe"}
        self.write_json(self.converted / ("%s.json" % c.id), raw)

    def get_converted(self, cid: str) -> Converted | None:
        raw = self.read_json(self.converted / ("%s.json" % cid))
        return _converted(raw) if raw else None

    def all_converted(self) -> dict[str, Converted]:
        from .scan import scan

        return dict(scan(self).converted)

    def remove_converted(self, cid: str) -> None:
        (self.converted / ("%s.json" % cid)).unlink(missing_ok=True)

    def versions(self, name: str) -> list[Version]:
        raw = self.read_json(self.names / ("%s.json" % name)) or {"versions": []}
        return [Version(name=name, **v) for v in raw["versions"]]

    def all_versions(self) -> list[Version]:
        out = []
        for raw, path in self._read_all(self.names, with_path=True):
            name = path.stem
            out += [Version(name=name, **v) for v in raw["versions"]]
        return out

    def put_versions(self, name: str, versions: list[Version]) -> None:
        path = self.names / ("%s.json" % name)
        if not versions:
            path.unlink(missing_ok=True)
            return
        rows = [{"version": v.version, "source": v.source, "added": v.added, "origin": v.origin} for v in versions]
        self.write_json(path, {"format": BASE_FORMAT, "versions": rows})

    def put_link(self, link: Link) -> None:
        self.write_json(self.links / link.env / ("%s.json" % link.source), _to_json(link))

    def get_link(self, env: str, source: str) -> Link | None:
        raw = self.read_json(self.links / env / ("%s.json" % source))
        return Link(**_fields(raw)) if raw else None

    def remove_link(self, env: str, source: str) -> None:
        (self.links / env / ("%s.json" % source)).unlink(missing_ok=True)

    def put_env(self, env: Environment) -> None:
        self.write_json(self.envs / ("%s.json" % env.name), _to_json(env))

    def get_env(self, name: str) -> Environment | None:
        raw = self.read_json(self.envs / ("%s.json" % name))
        return Environment(**_fields(raw)) if raw else None

    def all_envs(self) -> list[Environment]:
        return [Environment(**_fields(r)) for r in self._read_all(self.envs)]

    def remove_env(self, name: str) -> None:
        (self.envs / ("%s.json" % name)).unlink(missing_ok=True)
        (self.pins / ("%s.json" % name)).unlink(missing_ok=True)
        import shutil

        shutil.rmtree(self.links / name, ignore_errors=True)

    def all_publications(self) -> list[Publication]:
        raw = self.read_json(self.publications) or {"publications": []}
        return [Publication(**p) for p in raw["publications"]]

    def put_publications(self, publications: list[Publication]) -> None:
        self.write_json(self.publications, {"format": BASE_FORMAT, "publications": [asdict(p) for p in publications]})

    def pins_of(self, env: str) -> dict[str, int]:
        return _pins(self.read_json(self.pins / ("%s.json" % env)))

    def put_pins(self, env: str, pins: dict[str, int]) -> None:
        self.write_json(self.pins / ("%s.json" % env), {"format": BASE_FORMAT, "pins": pins})

    def all_pins(self) -> dict[str, dict[str, int]]:
        return {p.stem: self.pins_of(p.stem) for p in sorted(self.pins.glob("*.json"))} if self.pins.is_dir() else {}

    def _read_all(self, folder: Path, with_path: bool = False):
        if not folder.is_dir():
            return []
        out = []
        # names sorted as strings: sorting 10,000 Path objects costs more than reading them
        for name in sorted(n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith(".")):
            path = folder / name
            try:
                raw = self.read_json(path)
            except CachectlError:
                continue  # one damaged manifest must not hide the rest; verify reports it
            if raw is not None:
                out.append((raw, path) if with_path else raw)
        return out



def _pins(raw) -> dict[str, int]:
    if raw is None:
        return {}
    # before format 1 a pins file was the bare {name: version} mapping
    return dict(raw["pins"]) if "pins" in raw and "format" in raw else raw


def _source(raw: dict) -> Source:
    # before the version was written, "format" held the checkpoint's format (a string)
    checkpoint_format = raw.get("checkpoint_format", raw.get("format") if isinstance(raw.get("format"), str) else None)
    raw = {k: v for k, v in raw.items() if k not in ("format", "checkpoint_format")}
    raw["format"] = checkpoint_format
    raw["timm_versions"] = tuple(raw.get("timm_versions") or ())
    raw["prefixes"] = tuple(raw.get("prefixes") or ())
    return Source(**raw)


def _converted(raw: dict) -> Converted:
    raw = _fields(raw)
    raw["steps"] = tuple(raw.get("steps") or ())
    return Converted(**raw)
