"""What a checkpoint is, in one value: the answer of `cachectl inspect`.

It costs what reading headers costs: the file's layout comes from cachectl/headers.py
(torch is imported only for a file the headers alone cannot describe), and whether it
loads as-is in the target is answered from the catalog's layouts when the target's timm
release is catalogued; only an uncatalogued release, or a model built otherwise than the
catalog built it, is asked of the target interpreter itself.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .catalog import Catalog, name_candidates, version_key
from .errors import CachectlError, NoPlanError, few
from .headers import NotPlain, read_header
from .identify import Candidate, Tag, find, part_of
from .layout import Layout, is_under

@dataclass(frozen=True)
class PartReport:
    """One timm model in the file: all of it, or one part of a larger model."""

    prefix: str  # its keys' prefix in the file ("" when the file is this model)
    architecture: str | None  # the name in the installed timm (None: it has no such model)
    source_architecture: str  # the name in the producing releases
    timm_versions: tuple[str, ...]
    confidence: str  # exact | exact-but-classifier | partial | ambiguous
    score: float
    num_classes: int | None
    chosen_by: str
    ambiguous: tuple[Candidate, ...]  # look-alikes that may compute differently; --model decides
    alternatives: tuple[Candidate, ...]
    tensors: int
    loads_as_is: bool
    as_is_problem: str | None

    def to_json(self) -> dict:
        return {
            "prefix": self.prefix,
            "architecture": self.architecture,
            "source_architecture": self.source_architecture,
            "timm_versions": list(self.timm_versions),
            "confidence": self.confidence,
            "score": self.score,
            "num_classes": self.num_classes,
            "chosen_by": self.chosen_by,
            "ambiguous": [_candidate_json(c) for c in self.ambiguous],
            "alternatives": [_candidate_json(c) for c in self.alternatives],
            "tensors": self.tensors,
            "loads_as_is": self.loads_as_is,
            "as_is_problem": self.as_is_problem,
        }


def _candidate_json(c: Candidate) -> dict:
    return {"architecture": c.architecture, "timm_versions": list(c.timm_versions),
            "confidence": c.confidence, "score": c.score}


@dataclass(frozen=True)
class Report:
    file: Path
    format: str
    size: int
    tensors: int
    parameters: int
    container: str | None
    other_containers: tuple[str, ...]
    stripped_prefix: str
    layout: str
    parts: tuple[PartReport, ...]  # one per timm model found; the first is described at the top level
    passthrough: tuple[str, ...]  # keys outside every timm model (a wrapped checkpoint)
    installed_timm: str

    @property
    def main(self) -> PartReport:
        return self.parts[0]

    @property
    def wrapped(self) -> bool:
        return any(p.prefix for p in self.parts)

    def to_json(self) -> dict:
        main = self.main.to_json()
        return {
            "file": str(self.file),
            "format": self.format,
            "size": self.size,
            "tensors": self.tensors,
            "parameters": self.parameters,
            "container": self.container,
            "other_containers": list(self.other_containers),
            "stripped_prefix": self.stripped_prefix,
            "layout": self.layout,
            **{k: main[k] for k in ("architecture", "source_architecture", "timm_versions", "confidence", "score",
                                    "num_classes", "chosen_by", "ambiguous", "alternatives")},
            "installed_timm": self.installed_timm,
            "loads_as_is": all(p.loads_as_is for p in self.parts),
            "as_is_problem": "; ".join(
                ("%s: %s" % (p.prefix, p.as_is_problem)) if p.prefix else p.as_is_problem
                for p in self.parts if p.as_is_problem) or None,
            "prefixes": [p.prefix for p in self.parts if p.prefix],
            "passthrough": len(self.passthrough),
            "parts": [p.to_json() for p in self.parts],
        }


def inspect_file(path: str | Path, python: str | None = None, *, catalog: Catalog | None = None, ema: bool = True,
                 model: str | None = None, prefixes: tuple[str, ...] | None = None) -> Report:
    """Inspect `path` for the timm of `python` (None: the one beside cachectl)."""
    catalog = catalog or Catalog.load()
    try:
        ckpt = read_header(path, ema=ema)
    except NotPlain:
        from .reader import read  # it explains what is wrong, or reads what the headers cannot say

        ckpt = read(path, ema=ema)
    found = find(ckpt, catalog, model=model, prefixes=prefixes)
    release = timm_release(python)
    target = None
    parts = []
    try:
        for t in found.tags:
            part = part_of(ckpt, t.prefix)
            answer = from_catalog(t, part, catalog, release, model) if release in catalog.releases else None
            if answer is None:
                if target is None:
                    from .target import Target

                    target = Target(python)
                answer = from_target(t, part, target, catalog, model)
            parts.append(_part_report(part, t, answer))
        installed = release if target is None else target.info().timm
    finally:
        if target is not None:
            target.close()
    return Report(
        file=ckpt.path, format=ckpt.format, size=ckpt.size, tensors=len(ckpt.layout.tensors),
        parameters=sum(s.numel for _, s in ckpt.layout.tensors), container=ckpt.container,
        other_containers=ckpt.other_containers, stripped_prefix=ckpt.stripped_prefix,
        layout=ckpt.layout.layout_id, parts=tuple(parts),
        passthrough=tuple(ckpt.stripped_prefix + k for k in found.passthrough),
        installed_timm=installed,
    )


def timm_release(python: str | None) -> str | None:
    """The timm release of `python` (None: this interpreter) from its package metadata, without
    importing timm; None when that cannot be told so (the agent then asks timm itself)."""
    if python is None:
        return installed_release("timm")
    import subprocess

    try:
        proc = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('timm'))"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def installed_release(package: str) -> str | None:
    """The release of `package` that imports in this interpreter, from the dist-info beside it,
    without importing it; None when that cannot be told so."""
    # importlib.metadata costs 50 ms to import: the folder beside the package first
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        return None
    found = list(Path(spec.origin).parent.parent.glob("%s-*.dist-info" % package))
    if len(found) == 1:
        return found[0].name[len(package) + 1:-len(".dist-info")]
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class AsIs:
    """Whether a part loads strictly as it is: the model to build for it, and why not."""

    architecture: str | None  # the name in the target timm (None: it has no such model)
    loads: bool
    problem: str | None


def from_catalog(tag: Tag, ckpt, catalog: Catalog, release: str, override: str | None) -> AsIs | None:
    """What the target would answer (convert.target_model, its describe, strict_check),
    from the catalog's layouts of `release`; None where the catalog did not build the model
    the target would (a pretrained tag other than the default, a model the dump could not build)."""
    models, renamed = catalog.models(release), catalog.deprecated(release)
    names = [override] if override else name_candidates(catalog, tag.best.architecture, ckpt.hints.architecture)
    for candidate in names:
        if candidate in renamed:
            resolved = renamed[candidate]
        elif candidate.split(".")[0] in models:
            base = candidate.split(".")[0]
            resolved = candidate if "." in candidate and version_key(release) >= (0, 9) else base
        elif candidate.split(".")[0] in catalog.failed(release):
            return None
        else:
            continue
        break
    else:
        return AsIs(None, False, str(NoPlanError(
            ckpt.path, "timm %s has no model %s" % (release, " or ".join(names)),
            "Convert for an environment with a timm release that has it, or pass --model NAME.")))
    base, _, wanted_tag = resolved.partition(".")
    entry = models.get(base)
    tags = catalog.tags(release, base)
    if entry is None or (wanted_tag and (not tags or tags[0].tag != wanted_tag)):
        return None
    n = tag.best.num_classes
    if (n is None or n == entry.default_num_classes) and entry in catalog.by_layout(ckpt.layout.layout_id):
        return AsIs(resolved, True, None)  # the same layout: no need to read the catalog's layouts
    want = catalog.layout(entry.layout_index)
    if n is not None and n != entry.default_num_classes:
        if not entry.classifier:
            return None
        rows = []
        for k, spec in want.tensors:
            if is_under(k, entry.classifier):
                if n == 0:
                    continue  # no head: its keys go
                if not spec.shape or spec.shape[0] != entry.default_num_classes:
                    return None
                spec = type(spec)((n,) + spec.shape[1:], spec.dtype)
            rows.append((k, spec))
        want = Layout(tuple(rows))
    problem = mismatch(ckpt.layout, want)
    return AsIs(resolved, problem is None, problem)


def mismatch(have: Layout, want: Layout, limit: int = 6) -> str | None:
    """convert.strict_check's answer on layouts: None when they are equal, else what differs."""
    got, wanted = have.specs, want.specs
    parts = []
    for label, items in (("missing", [k for k in wanted if k not in got]),
                         ("unexpected", sorted(k for k in got if k not in wanted))):
        if items:
            parts.append("%s %s" % (label, few(items, limit)))
    shapes = [(k, got[k].shape, s.shape) for k, s in wanted.items() if k in got and got[k].shape != s.shape]
    if shapes:
        parts.append("shape %s" % "; ".join("%s %s vs %s" % (k, list(a), list(b)) for k, a, b in shapes[:limit]))
    return "; ".join(parts) or None


def from_target(tag: Tag, ckpt, target, catalog: Catalog, model: str | None) -> AsIs:
    """Ask the target interpreter: build the model, compare its state dict's layout."""
    from .convert import target_model

    try:
        choice = target_model(tag, ckpt, target, catalog, model)
        spec = target.describe(choice.name, choice.kwargs)
    except CachectlError as exc:
        return AsIs(None, False, str(exc))
    problem = mismatch(ckpt.layout, spec.layout)
    return AsIs(choice.name, problem is None, problem)


def _part_report(ckpt, tag: Tag, answer: AsIs) -> PartReport:
    best = tag.best
    return PartReport(
        prefix=(ckpt.stripped_prefix + tag.prefix) if tag.prefix else "", architecture=answer.architecture,
        source_architecture=best.architecture, timm_versions=best.timm_versions, confidence=tag.confidence,
        score=best.score, num_classes=best.num_classes, chosen_by=tag.chosen_by, ambiguous=tag.ambiguous,
        alternatives=tag.alternatives, tensors=len(ckpt.layout.tensors), loads_as_is=answer.loads,
        as_is_problem=answer.problem,
    )
