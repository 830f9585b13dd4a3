"""What a checkpoint is, in one value: the answer of `cachectl inspect`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .catalog import Catalog
from .convert import strict_check, target_model
from .errors import CachectlError
from .identify import Candidate, Tag, find, part_of
from .reader import Checkpoint, read
from .target import Target


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


def inspect_file(path: str | Path, target: Target, *, catalog: Catalog | None = None, ema: bool = True,
                 model: str | None = None, prefixes: tuple[str, ...] | None = None) -> Report:
    catalog = catalog or Catalog.load()
    ckpt = read(path, ema=ema)
    found = find(ckpt, catalog, model=model, prefixes=prefixes)
    parts = tuple(_part_report(part_of(ckpt, t.prefix), t, target, catalog, model)
                  for t in found.tags)
    return Report(
        file=ckpt.path, format=ckpt.format, size=ckpt.size, tensors=len(ckpt.layout.tensors),
        parameters=sum(s.numel for _, s in ckpt.layout.tensors), container=ckpt.container,
        other_containers=ckpt.other_containers, stripped_prefix=ckpt.stripped_prefix,
        layout=ckpt.layout.layout_id, parts=parts,
        passthrough=tuple(ckpt.stripped_prefix + k for k in found.passthrough),
        installed_timm=target.info().timm,
    )


def _part_report(ckpt: Checkpoint, tag: Tag, target: Target, catalog: Catalog, model: str | None) -> PartReport:
    best = tag.best
    try:
        choice = target_model(tag, ckpt, target, catalog, model)
        spec = target.describe(choice.name, choice.kwargs)
        mismatch = strict_check(ckpt.tensors, spec.layout)
        name, loads, problem = choice.name, mismatch.ok, None if mismatch.ok else mismatch.describe()
    except CachectlError as exc:
        name, loads, problem = None, False, str(exc)
    return PartReport(
        prefix=(ckpt.stripped_prefix + tag.prefix) if tag.prefix else "", architecture=name,
        source_architecture=best.architecture, timm_versions=best.timm_versions, confidence=tag.confidence,
        score=best.score, num_classes=best.num_classes, chosen_by=tag.chosen_by, ambiguous=tag.ambiguous,
        alternatives=tag.alternatives, tensors=len(ckpt.layout.tensors), loads_as_is=loads, as_is_problem=problem,
    )
