"""The project's own layout migrations, one module per timm model family.

A migration moves a state dict between an older and a newer layout of one family, in
both directions. It is declarative about when it applies (`is_old`, asked of the source
keys and of the target's keys) and is tried only where the two sides differ; the
planner then checks the result strictly against the target model, so a migration that
does not fit a model is simply not chosen. Each is proven by tests/test_family_*.py:
made and run under the old release, converted, run under the new one, outputs equal.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Migration:
    # timm's module names for the family, all of them when it moved (poolformer -> metaformer)
    families: tuple[str, ...]
    name: str  # what changed, e.g. "downsample-at-stage-start"
    # keys in the older layout? None for a migration that only asks for kwargs
    is_old: Callable[[frozenset[str]], bool] | None = None
    upgrade: Callable[[State], State] | None = None
    downgrade: Callable[[State], State] | None = None
    # kwargs the target model needs for this source, where an architecture default
    # changed between releases: (source keys, target keys) -> {arg: value}
    kwargs: Callable[[frozenset[str], frozenset[str]], dict] | None = None

    @property
    def family(self) -> str:
        return self.families[0]


@dataclass(frozen=True)
class MathChange:
    """Releases in which some models compute differently, whatever their keys say.

    No weights can carry a file across such a change, so the planner refuses to."""

    families: tuple[str, ...]
    applies: Callable[[str], bool]  # model name -> affected?
    first: str  # first release with the other math
    last: str  # last release with it
    reason: str


_REGISTRY: list[Migration] = []
_MATH: list[MathChange] = []


def register(*migrations: Migration) -> None:
    _REGISTRY.extend(migrations)


def register_math_change(*changes: MathChange) -> None:
    _MATH.extend(changes)


def math_changes(family: str, model: str) -> list[MathChange]:
    _load_all()
    return [c for c in _MATH if family in c.families and c.applies(model)]


def all_math_changes() -> list[MathChange]:
    """Every hand-written math change (tests/test_fingerprints.py proves each on the catalog)."""
    _load_all()
    return list(_MATH)


def for_family(family: str) -> list[Migration]:
    _load_all()
    return [m for m in _REGISTRY if family in m.families]


def applicable(family: str, source_keys: Iterable[str], target_keys: Iterable[str]) -> list[tuple[Migration, str]]:
    """(migration, "upgrade"|"downgrade") for each migration whose sides differ."""
    src, dst = frozenset(source_keys), frozenset(target_keys)
    out = []
    for m in for_family(family):
        if m.is_old is None:
            continue
        old_src, old_dst = m.is_old(src), m.is_old(dst)
        if old_src and not old_dst:
            out.append((m, "upgrade"))
        elif old_dst and not old_src:
            out.append((m, "downgrade"))
    return out


def kwargs_for(family: str, source_keys: Iterable[str], target_keys: Iterable[str]) -> dict:
    """Architecture arguments the family's migrations ask of the target for this source."""
    src, dst = frozenset(source_keys), frozenset(target_keys)
    out: dict = {}
    for m in for_family(family):
        if m.kwargs is not None:
            out.update(m.kwargs(src, dst))
    return out


def rename(state: Mapping[str, torch.Tensor], fn: Callable[[str], str]) -> State:
    return {fn(k): v for k, v in state.items()}


_loaded = False


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module("%s.%s" % (__name__, info.name))
        _loaded = True
