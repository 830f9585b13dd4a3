"""The daemon's settings: flags over CACHECTL_* variables over the TOML file over defaults.

    # <root>/cachectld.toml (or --config PATH, or $CACHECTL_CONFIG)
    watch = ["/shared/weights", "/shared/hf-hub"]   # relative paths: from this file's folder
    quiet_seconds = 2          # a file unchanged this long is complete (scp, rsync --inplace, NFS)
    rescan_seconds = 300       # full rescan, the safety net for missed events
    polling = "auto"           # auto: poll folders on nfs, nfs4, cifs, smb3, lustre, fuse.sshfs
    poll_interval = 5          # seconds between two polls of a polled folder
    workers = 1                # conversion processes
    queue_size = 64            # complete files waiting for a worker; the rest wait in the folder
    task_timeout_seconds = 3600
    memory_limit_mb = 0        # address space a conversion may add to a worker; 0: no limit
    stop_grace_seconds = 60    # on SIGTERM, how long conversions in flight may still run

Every key has a variable: CACHECTL_QUIET_SECONDS=5, CACHECTL_WATCH=/a:/b (':'-separated).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

from cachectl.errors import CachectlError
from cachectl.paths import default_root

CONFIG_NAME = "cachectld.toml"
POLLING = ("auto", "on", "off")
# Filesystems whose changes made by other clients inotify never sees.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "lustre", "fuse.sshfs"})


class ConfigError(CachectlError):
    """A setting the daemon cannot use; names where it came from."""


def _setting(default, least: float):
    return field(default=default, metadata={"least": least})


@dataclass(frozen=True)
class Config:
    root: Path
    watch: tuple[Path, ...] = field(default=(), metadata={"least": 0})
    quiet_seconds: float = _setting(2.0, 0)
    rescan_seconds: float = _setting(300.0, 1)
    polling: str = _setting("auto", 0)
    poll_interval: float = _setting(5.0, 0.1)
    workers: int = _setting(1, 1)
    queue_size: int = _setting(64, 1)
    task_timeout_seconds: float = _setting(3600.0, 0.1)
    memory_limit_mb: int = _setting(0, 0)
    stop_grace_seconds: float = _setting(60.0, 0)
    file: Path | None = None  # the TOML file these came from, if any


# what the file, the environment and the flags may set: all but `root` and `file`
SETTINGS = {f.name: f for f in fields(Config) if "least" in f.metadata}


@dataclass(frozen=True)
class Watch:
    """One watched folder and how it is watched."""

    path: Path
    polling: bool
    why: str  # "inotify", "polling = on", "on an nfs4 mount", ...


def load(root: Path | None, config_file: Path | None, flags: Mapping[str, object],
         environ: Mapping[str, str] = os.environ) -> Config:
    """The settings in force: `flags` (given on the command line) > environ > the file > defaults."""
    root = (root or default_root(environ)).expanduser().absolute()
    explicit = config_file or (Path(environ["CACHECTL_CONFIG"]) if environ.get("CACHECTL_CONFIG") else None)
    path = (explicit or root / CONFIG_NAME).expanduser().absolute()
    values: dict[str, object] = {}
    if explicit or path.is_file():
        values.update(_read_file(path))
    for name in SETTINGS:
        var = "CACHECTL_" + name.upper()
        if environ.get(var):
            values[name] = _value(name, environ[var], "$" + var)
    for name, raw in flags.items():
        values[name] = _value(name, raw, "--" + name.replace("_", "-"))
    watch = values.pop("watch", None) or (root / "inbox",)
    return Config(root=root, watch=tuple(dict.fromkeys(p.absolute() for p in watch)),
                  file=path if path.is_file() else None, **values)


def _read_file(path: Path) -> dict[str, object]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: tomllib's ancestor, when installed
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(path, "reading it needs Python 3.11 or the tomli package",
                              "pip install tomli, or give the settings as flags or CACHECTL_* variables.")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "no such settings file", "Create it, or drop --config / $CACHECTL_CONFIG.")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "is not valid TOML (%s)" % exc, "Fix the line it names.")
    unknown = sorted(set(raw) - set(SETTINGS))
    if unknown:
        raise ConfigError(path, "unknown setting %s" % ", ".join(unknown), "Known settings: %s." % ", ".join(SETTINGS))
    values = {name: _value(name, v, "%s: %s" % (path, name)) for name, v in raw.items()}
    if "watch" in values:  # relative to the file, not to wherever the daemon was started
        values["watch"] = tuple(path.parent / p for p in values["watch"])
    return values


def _value(name: str, raw: object, where: str) -> object:
    """`raw` (a string from the environment, or a TOML or click value) as setting `name` wants."""
    kind, least = type(SETTINGS[name].default), SETTINGS[name].metadata["least"]
    if kind is tuple:
        items = raw.split(os.pathsep) if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)) or not all(isinstance(p, (str, Path)) for p in items):
            raise ConfigError(None, "%s must be a list of folders, not %r" % (where, raw), 'Write it as ["/a", "/b"].')
        return tuple(Path(p).expanduser() for p in items if str(p))
    if kind is str:
        if str(raw).lower() not in POLLING:
            raise ConfigError(None, "%s must be one of %s, not %r" % (where, ", ".join(POLLING), raw), "Use one of those.")
        return str(raw).lower()
    try:
        if isinstance(raw, bool) or (kind is int and isinstance(raw, float) and not raw.is_integer()):
            raise ValueError
        value = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(None, "%s must be %s, not %r" % (where, "a whole number" if kind is int else "a number", raw),
                          "Give a number, e.g. %s = %s." % (name, 2 if kind is int else 2.5))
    if value < least:
        raise ConfigError(None, "%s must be at least %s, not %s" % (where, least, value), "Give a larger value.")
    return value


def watches(cfg: Config, mounts: str = "/proc/mounts") -> tuple[Watch, ...]:
    """Each watched folder with the way to watch it: polling where inotify would miss writes."""
    if cfg.polling != "auto":
        return tuple(Watch(p, cfg.polling == "on", "polling = %s" % cfg.polling) for p in cfg.watch)
    table = _mounts(mounts)
    out = []
    for p in cfg.watch:
        fstype = filesystem_type(p, table)
        remote = fstype in NETWORK_FILESYSTEMS
        out.append(Watch(p, remote, "on a %s mount" % fstype if remote else "inotify"))
    return tuple(out)


def filesystem_type(path: Path, table: list[tuple[str, str]]) -> str | None:
    """The type of the filesystem `path` lies on: the longest mount point above it wins."""
    real = os.path.realpath(path)
    best, fstype = "", None
    for point, kind in table:
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, kind
    return fstype


def _mounts(mounts: str) -> list[tuple[str, str]]:
    try:
        with open(mounts) as f:
            lines = f.read().splitlines()
    except OSError:
        return []  # no /proc (a container without it): inotify, as on a local disk
    # the kernel writes spaces, tabs, newlines and backslashes in mount points as \\ooo
    unescape = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)  # noqa: E731
    return [(unescape(f[1]), f[2]) for f in (line.split() for line in lines) if len(f) >= 3]
