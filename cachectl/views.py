"""Views: per environment, the folders its own timm reads for `pretrained=True`, offline.

    <root>/views/<env>/hub/models--<org>--<name>/refs/main                  a revision
    <root>/views/<env>/hub/models--<org>--<name>/snapshots/<rev>/model.safetensors   (timm 0.9+)
    <root>/views/<env>/hub/models--<org>--<name>/snapshots/<rev>/pytorch_model.bin   (before 0.9)
    <root>/views/<env>/hub/models--<org>--<name>/snapshots/<rev>/config.json
    <root>/views/<env>/torch/hub/checkpoints/<basename of the pretrained URL>       (torch format)
    <root>/views/<env>/view.json                                               what is served

Weights are relative symlinks to converted blobs in the store, never copies, so the
store can be mounted anywhere. A view changes atomically for its readers: a new
snapshot is complete before `refs/main` is renamed over to name it, a checkpoint link is
replaced by rename, and a snapshot that stops being current stays for GRACE_SECONDS, so
a reader that read `refs/main` just before still finds its file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from . import pretrained
from .catalog import Catalog, version_key
from .store import Converted, Store
from .tempnames import temp_path, writer_alive

FORMAT = 1
GRACE_SECONDS = 15 * 60
SAFE_WEIGHTS = "model.safetensors"
TORCH_WEIGHTS = "pytorch_model.bin"
# pretrained files timm reads with its own loader rather than torch.load: not servable
CUSTOM_LOADERS = (".npz",)


@dataclass(frozen=True)
class Entry:
    """A converted file the environment could serve, and the keys that say what it is."""

    version: str  # NAME@VERSION
    converted: Converted
    keys: frozenset[str]
    added: float
    published: str | None = None  # the name given with `publish --as`, which wins over the file's own


@dataclass(frozen=True)
class Served:
    pretrained: str  # the name in the environment's timm: `create_model(pretrained, pretrained=True)`
    version: str
    converted: str  # Converted.id
    blob: str  # the file linked, relative to the store's blobs folder
    how: str  # what decided that this file is that pretrained model
    hub_repo: str | None = None  # hub cache folder the environment's timm reads
    hub_file: str | None = None
    checkpoint: str | None = None  # torch.hub checkpoints file name
    config: Mapping = field(default_factory=dict, compare=False)  # config.json, for hub_repo


@dataclass(frozen=True)
class Skipped:
    pretrained: str
    version: str
    reason: str


@dataclass(frozen=True)
class ViewPlan:
    env: str
    timm: str
    served: tuple[Served, ...]
    skipped: tuple[Skipped, ...]

    def to_json(self) -> dict:
        served = [{k: v for k, v in asdict(s).items() if k != "config"} for s in self.served]
        return {"format": FORMAT, "env": self.env, "timm": self.timm, "served": served,
                "skipped": [asdict(s) for s in self.skipped]}


def view_dir(store: Store, env: str) -> Path:
    return store.root / "views" / env


def variables(store: Store, env: str) -> dict[str, str]:
    """What points an environment's timm, huggingface_hub and torch.hub at its view, offline.

    huggingface_hub before 0.16 reads HUGGINGFACE_HUB_CACHE, later ones HF_HUB_CACHE;
    torch.hub reads $TORCH_HOME/hub. HF_HUB_OFFLINE keeps both from trying the network.
    TIMM_USE_OLD_CACHE makes timm 0.9 and later take a torch.hub file the view holds (it
    holds one only where the hub cache cannot serve: no hub repo, or no huggingface_hub)."""
    root = view_dir(store, env)
    return {
        "HF_HUB_CACHE": str(root / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(root / "hub"),
        "HF_HUB_OFFLINE": "1",
        "TORCH_HOME": str(root / "torch"),
        "TIMM_USE_OLD_CACHE": "1",
    }


def lookup_release(catalog: Catalog, timm: str) -> str:
    """The catalogued release whose pretrained configs stand for `timm`'s: itself, else the
    newest older one (the environment's own timm confirms each config it is asked for)."""
    older = [r for r in catalog.releases if version_key(r) <= version_key(timm)]
    return timm if timm in catalog.releases else (older[-1] if older else catalog.releases[0])


def plan(env: str, timm: str, hub: bool, entries: list[Entry], catalog: Catalog,
         cfg_of: Callable[[str], dict | None], blob_of: Callable[[Converted, bool], str],
         check: Callable[[str, Converted, bool], str | None]) -> ViewPlan:
    """What the view of `env` (timm release `timm`) serves.

    `cfg_of(name)` asks the environment's timm for a pretrained config (None: it has none);
    `blob_of(c, torch_format)` names the blob of `c` to link, relative to the blobs folder;
    a torch-format copy (made on demand) serves timm before 0.9 and URL-only configs.
    `hub`: the environment's timm can import its huggingface_hub; timm 0.9 and later
    without one read torch.hub's folder only (with TIMM_USE_OLD_CACHE, which activate sets).
    `check(name, c, torch_format)` says why the environment's own pretrained loader (its
    checkpoint filter) would not load that file unchanged, or None when it would. Published entries come first, then newer versions: the first
    to claim a pretrained name serves it; the rest are listed as skipped, with why."""
    release = lookup_release(catalog, timm)
    hub_first = pretrained.hub_first(timm) and hub
    served: dict[str, Served] = {}
    skipped: list[Skipped] = []
    for entry in sorted(entries, key=lambda e: (e.published is None, -e.added)):
        matches = pretrained.serving(catalog, release, entry.keys)
        names = [(m.cfg.name, m.how) for m in matches]
        if entry.published and not any(n == entry.published or entry.published.endswith("/" + n) for n, _ in names):
            names.insert(0, (entry.published, "published as %s" % entry.published))
        for name, how in names:
            if name in served:
                skipped.append(Skipped(name, entry.version, "%s serves it" % served[name].version))
                continue
            result = _serve(name, how, entry, timm, hub_first, hub, cfg_of, blob_of, check)
            if isinstance(result, Skipped):
                skipped.append(result)
            else:
                served[name] = result
    return ViewPlan(env, timm, tuple(served[k] for k in sorted(served)), tuple(skipped))


def _serve(name: str, how: str, entry: Entry, timm: str, hub_first: bool, hub_ok: bool,
           cfg_of: Callable[[str], dict | None], blob_of: Callable[[Converted, bool], str],
           check: Callable[[str, Converted, bool], str | None]) -> Served | Skipped:
    c = entry.converted
    model, _, tag = name.partition(".")
    if "/" in name:  # a hub repo id given to publish: the architecture is the converted model
        model, tag = c.model.split(".")[0], ""
    if c.model.split(".")[0] != model:
        return Skipped(name, entry.version, "converted as %s, while timm %s builds %s" % (c.model, timm, model))
    kwargs = dict(c.model_kwargs)
    num_classes = kwargs.pop("num_classes", None)
    cfg = cfg_of(name) if "/" not in name else None
    registry = cfg is not None
    if cfg is None:
        # not a pretrained name of this timm: served only as a hub repo, described by its
        # own config.json, which `create_model("hf-hub:<repo>")` reads
        if not entry.published:
            return Skipped(name, entry.version, "timm %s has no pretrained config %s" % (timm, name))
        cfg = cfg_of(model) or {}
        repo = name if "/" in name else "timm/" + name
        cfg = {**cfg, "hf_hub_id": repo, "url": "", "tag": tag or None}
    else:
        if kwargs:
            return Skipped(name, entry.version, "it needs %s, which timm %s does not build %s with for pretrained=True"
                           % (json.dumps(kwargs, sort_keys=True), timm, name))
        if num_classes is not None and cfg.get("num_classes") not in (None, num_classes):
            return Skipped(name, entry.version, (
                "its %d classes differ from the %s of %s: publish it under a tag of its own "
                "(cachectl publish %s --as %s.<tag>) and load it with create_model('hf-hub:timm/%s.<tag>')")
                % (num_classes, cfg.get("num_classes"), name, entry.version, model, model))
    hub = cfg.get("hf_hub_id") or None
    if hub and hub.endswith("/"):
        hub += name
    url = cfg.get("url") or ""
    basename = url.rsplit("/", 1)[-1].split("?")[0] if url else ""
    if basename.endswith(CUSTOM_LOADERS):
        basename = ""  # timm loads these with numpy, not torch.load
    if not hub_first and kwargs:
        return Skipped(name, entry.version, "timm %s cannot rebuild it from config.json (it needs %s)" % (
            timm, json.dumps(kwargs, sort_keys=True)))
    if not hub_ok:
        hub = None  # this timm cannot read the hub cache: the torch.hub folder only
    use_hub = bool(hub) and (hub_first or not basename)
    use_url = bool(basename) and (not hub_first or not hub)
    if not (use_hub or use_url):
        if not hub_ok and cfg.get("hf_hub_id"):
            return Skipped(name, entry.version, "timm %s here cannot import its huggingface_hub, and %s has no "
                           "pretrained URL: install a huggingface_hub of its time in the environment (0.20.3 "
                           "works with timm 0.9.16), then run cachectl env refresh" % (timm, name))
        return Skipped(name, entry.version, "timm %s fetches %s in a way a view cannot serve (%s)" % (
            timm, name, url or "no URL and no hub repo"))
    if cfg.get("label_offset"):
        return Skipped(name, entry.version, "timm %s drops the first %s classes of %s's head on loading" % (
            timm, cfg["label_offset"], name))
    # The two routes exclude each other: one file, in the format its loader reads. The
    # loader runs the release's checkpoint filter on it, and some filters (LeViT's in 0.9)
    # pair keys by position: a file is served only where its filter leaves it unchanged,
    # as safetensors where it can, else in torch format in the model's own key order.
    torch_format = not (use_hub and hub_first)
    reason = check(name, c, torch_format)
    if reason and not torch_format:
        torch_format, reason = True, check(name, c, True)
    if reason:
        return Skipped(name, entry.version, reason)
    return Served(
        pretrained=name, version=entry.version, converted=c.id, blob=blob_of(c, torch_format),
        how=how if registry or not entry.published else "published as %s" % entry.published,
        hub_repo=hub if use_hub else None,
        hub_file=(TORCH_WEIGHTS if torch_format else SAFE_WEIGHTS) if use_hub else None,
        checkpoint=basename if use_url else None,
        config=_config(cfg, model, num_classes, kwargs, hub_first) if use_hub else {},
    )


def _config(cfg: Mapping, model: str, num_classes: int | None, kwargs: Mapping, hub_first: bool) -> dict:
    """config.json as the environment's own timm writes it (push_to_hf_hub / save_for_hf)."""
    pretrained_cfg = {k: v for k, v in cfg.items() if k not in ("hf_hub_id", "url", "file", "source", "state_dict")}
    if num_classes is not None:
        pretrained_cfg["num_classes"] = num_classes
    classes = pretrained_cfg.get("num_classes")
    if not hub_first:  # one flat dict before 0.9
        return {**pretrained_cfg, "architecture": model, "num_classes": classes}
    pretrained_cfg.pop("architecture", None)
    out = {"architecture": model, "num_classes": classes, "pretrained_cfg": pretrained_cfg}
    if kwargs:
        out["model_args"] = dict(kwargs)
    return out


# -- on disk ------------------------------------------------------------------------------


def apply(store: Store, view: ViewPlan, now: float | None = None) -> None:
    """Make the view of `view.env` serve exactly `view`; readers never see it half done.

    The caller holds the lock `view:<env>`."""
    now = time.time() if now is None else now
    root = view_dir(store, view.env)
    hub, checkpoints = root / "hub", root / "torch" / "hub" / "checkpoints"
    for d in (hub, checkpoints):
        store.mkdir(d)  # with the store's modes: a group-shared store's members read the view
    repos: set[str] = set()
    files: set[str] = set()
    for s in view.served:
        target = store.blobs / s.blob
        if s.hub_repo:
            repo = hub / ("models--" + s.hub_repo.replace("/", "--"))
            repos.add(repo.name)
            _publish_snapshot(store, repo, s, target)
        if s.checkpoint:
            files.add(s.checkpoint)
            _replace_symlink(checkpoints / s.checkpoint, target)
    for repo in hub.iterdir():
        if repo.name.startswith("models--") and repo.name not in repos:
            _remove_dir(repo)
        elif repo.name in repos:
            _drop_stale_snapshots(repo, now)
    for path in checkpoints.iterdir():
        if path.name not in files and not path.name.startswith("."):
            path.unlink()
    store.write_json(root / "view.json", {**view.to_json(), "format": FORMAT})


def _publish_snapshot(store: Store, repo: Path, s: Served, target: Path) -> None:
    config = json.dumps(s.config, indent=2, sort_keys=True)
    rev = hashlib.sha1(("%s\n%s\n%s" % (s.blob, s.hub_file, config)).encode()).hexdigest()
    snapshots = repo / "snapshots"
    snapshot = snapshots / rev
    if not snapshot.is_dir():
        tmp = temp_path(snapshot)
        store.mkdir(tmp)
        os.symlink(os.path.relpath(target, snapshot), tmp / s.hub_file)
        store.write_file(tmp / "config.json", config.encode())
        try:
            os.rename(tmp, snapshot)
        except OSError:  # another writer published the same revision first
            shutil.rmtree(tmp, ignore_errors=True)
    main = repo / "refs" / "main"
    previous = main.read_text().strip() if main.is_file() else None
    if previous != rev:
        store.write_file(main, rev.encode())
        if previous and (snapshots / previous).is_dir():
            # its grace period starts now: its mtime says when it stopped being current
            os.utime(snapshots / previous)


def _drop_stale_snapshots(repo: Path, now: float) -> None:
    """Snapshots no longer named by refs/main, once no reader can still be on its way to one."""
    try:
        current = (repo / "refs" / "main").read_text().strip()
    except FileNotFoundError:
        return
    for snapshot in (repo / "snapshots").iterdir():
        # a temporary of a snapshot being written (here or on another host) is not stale
        if snapshot.name != current and snapshot.lstat().st_mtime < now - GRACE_SECONDS and not writer_alive(snapshot):
            _remove_dir(snapshot)


def _replace_symlink(path: Path, target: Path) -> None:
    link = os.path.relpath(target, path.parent)
    if path.is_symlink() and os.readlink(path) == link:
        return
    tmp = temp_path(path)
    os.symlink(link, tmp)
    os.replace(tmp, path)


def _remove_dir(path: Path) -> None:
    # renamed away first: a reader sees the folder whole or not at all
    hidden = temp_path(path)
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return
    shutil.rmtree(hidden, ignore_errors=True)


def remove(store: Store, env: str) -> None:
    """The view of an environment that is no longer registered."""
    if view_dir(store, env).is_dir():
        _remove_dir(view_dir(store, env))


def read(store: Store, env: str) -> dict | None:
    """The view.json of `env`: what it serves and what it skipped; None before the first build."""
    return store.read_json(view_dir(store, env) / "view.json")


def broken_links(store: Store, env: str) -> list[str]:
    """Links in the view of `env` that do not resolve, and refs naming no snapshot."""
    problems = []
    root = view_dir(store, env)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) and not os.path.exists(path):
                problems.append("%s: links to %s, which is missing" % (path, os.readlink(path)))
    hub = root / "hub"
    if hub.is_dir():
        for repo in hub.glob("models--*"):
            main = repo / "refs" / "main"
            if main.is_file() and not (repo / "snapshots" / main.read_text().strip()).is_dir():
                problems.append("%s: names a snapshot that is missing" % main)
    return problems
