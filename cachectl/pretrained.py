"""Pretrained names: which `arch.tag` a checkpoint is, and where a timm release looks for it.

A checkpoint's identity is a set of keys, each naming the same weights another way:
`name:<arch>.<tag>` (or `name:<arch>` before timm 0.9 had tags), `url:<basename of the
pretrained URL>` and `hub:<hub repo id>`. Keys come from the file itself (its hub repo,
its file name when that is a pretrained URL's basename) or from the user (`publish
--as`), and are widened through the catalog: every release's pretrained config that
shares a key adds its own keys, and the deprecation tables add old and new names. A
release serves a checkpoint under each of its pretrained configs that shares a key.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from urllib.parse import urlparse

from .catalog import Catalog, version_key

# From this release on timm reads pretrained weights from the hub cache (safetensors
# first); before it, from torch.hub's checkpoints folder, or the hub as pytorch_model.bin.
HUB_FIRST = "0.9"


@dataclass(frozen=True)
class PretrainedCfg:
    """One pretrained config of one release: what `create_model(name, pretrained=True)` fetches."""

    release: str
    model: str
    tag: str  # "" in releases before tags
    hub_id: str | None  # resolved: timm's "timm/" means "timm/<model>.<tag>"
    url: str | None
    num_classes: int | None
    default: bool  # the model's first tag: what `create_model(model, pretrained=True)` takes

    @property
    def name(self) -> str:
        return "%s.%s" % (self.model, self.tag) if self.tag else self.model

    @property
    def url_basename(self) -> str | None:
        return urlparse(self.url).path.rsplit("/", 1)[-1] or None if self.url else None

    def keys(self) -> frozenset[str]:
        keys = {"name:" + self.name}
        if self.url_basename:
            keys.add("url:" + self.url_basename)
        if self.hub_id:
            keys.add("hub:" + self.hub_id)
        return frozenset(keys)


def hub_first(release: str) -> bool:
    return version_key(release) >= version_key(HUB_FIRST)


@functools.lru_cache(maxsize=64)
def _cfgs(catalog: Catalog, release: str) -> tuple[PretrainedCfg, ...]:
    out = []
    for model in catalog.models(release):
        for i, t in enumerate(catalog.tags(release, model)):
            hub = t.hf_hub_id or None
            if hub and hub.endswith("/"):
                hub = hub + ("%s.%s" % (model, t.tag) if t.tag else model)
            out.append(PretrainedCfg(release, model, t.tag, hub, t.url or None, t.num_classes, i == 0))
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _by_key(catalog: Catalog) -> dict[str, list[PretrainedCfg]]:
    index: dict[str, list[PretrainedCfg]] = {}
    for release in catalog.releases:
        for cfg in _cfgs(catalog, release):
            for key in cfg.keys():
                index.setdefault(key, []).append(cfg)
    return index


@functools.lru_cache(maxsize=4)
def _renames(catalog: Catalog) -> dict[str, set[str]]:
    """name -> the names the deprecation tables make it equal to, both ways."""
    out: dict[str, set[str]] = {}
    for release in catalog.releases:
        for old, new in catalog.deprecated(release).items():
            out.setdefault(old, set()).add(new)
            out.setdefault(new, set()).add(old)
    return out


def model_names(catalog: Catalog, architecture: str) -> frozenset[str]:
    """`architecture` and every name the deprecation tables give the same model, without tags."""
    names = {architecture}
    for other in _renames(catalog).get(architecture, ()):
        names.add(other.split(".")[0])
    for name, others in _renames(catalog).items():
        if name.split(".")[0] == architecture:
            names |= {o.split(".")[0] for o in others}
    return frozenset(names)


def widen(catalog: Catalog, keys: set[str], models: frozenset[str] | None = None) -> frozenset[str]:
    """`keys` with every key of the catalogued configs that share one, and renamed names.

    Only configs of `models` (when given) count: a file named like a pretrained URL of
    another architecture is not that pretrained model."""
    out = set(keys)
    for key in keys:
        for cfg in _by_key(catalog).get(key, ()):
            if models is None or cfg.model in models:
                out |= cfg.keys()
    for key in [k for k in out if k.startswith("name:")]:
        for other in _renames(catalog).get(key[5:], ()):
            out.add("name:" + other)
    return frozenset(out)


def identity(catalog: Catalog, architecture: str | None, file_name: str | None, repo_id: str | None) -> frozenset[str]:
    """The keys a checkpoint brings by itself: its hub repo, its file name if a URL's basename."""
    keys: set[str] = set()
    if repo_id:
        keys.add("hub:" + repo_id)
        if repo_id.startswith("timm/"):
            keys.add("name:" + repo_id[5:])
    if not architecture:
        return frozenset()
    models = model_names(catalog, architecture)
    if file_name and any(cfg.model in models for cfg in _by_key(catalog).get("url:" + file_name, ())):
        keys.add("url:" + file_name)
    return widen(catalog, keys, models) if keys else frozenset()


def published(catalog: Catalog, name: str) -> frozenset[str]:
    """The keys of `publish --as NAME` (`arch.tag`, an old untagged name, or a hub repo id)."""
    if "/" in name:
        keys = {"hub:" + name}
        if name.startswith("timm/"):
            keys.add("name:" + name[5:])
    else:
        keys = {"name:" + name}
        if "." in name:
            keys.add("hub:timm/" + name)
    return widen(catalog, keys)


@dataclass(frozen=True)
class Match:
    cfg: PretrainedCfg
    how: str  # which key decided, said to the user


def serving(catalog: Catalog, release: str, keys: frozenset[str]) -> list[Match]:
    """The pretrained configs of `release` that these keys name."""
    out = []
    cfgs = _cfgs(catalog, release)
    for cfg in cfgs:
        shared = sorted(cfg.keys() & keys)
        if shared:
            out.append(Match(cfg, shared[0]))
    if out or not hub_first(release):
        return out
    # timm 0.9 moved weights without a URL to the hub as each model's default tag: an
    # untagged name of an older release (levit_128s) means that default (fb_dist_in1k)
    untagged = {k[5:] for k in keys if k.startswith("name:") and "." not in k}
    for cfg in cfgs:
        if cfg.default and not cfg.url and cfg.model in untagged:
            out.append(Match(cfg, "name:%s (timm 0.9 made its weights the default tag %s)" % (cfg.model, cfg.tag)))
    return out
