"""What a checkpoint is, in one value: the answer of `cachectl inspect`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .catalog import Catalog
from .convert import strict_check, target_model
from .errors import CachectlError
from .identify import Candidate, identify
from .reader import read
from .target import Target


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
    architecture: str | None  # the name in the installed timm (None: it has no such model)
    source_architecture: str  # the name in the producing releases
    timm_versions: tuple[str, ...]
    confidence: str
    score: float
    num_classes: int | None
    chosen_by: str
    alternatives: tuple[Candidate, ...]
    installed_timm: str
    loads_as_is: bool
    as_is_problem: str | None

    def to_json(self) -> dict:
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
            "architecture": self.architecture,
            "source_architecture": self.source_architecture,
            "timm_versions": list(self.timm_versions),
            "confidence": self.confidence,
            "score": self.score,
            "num_classes": self.num_classes,
            "chosen_by": self.chosen_by,
            "alternatives": [
                {"architecture": c.architecture, "timm_versions": list(c.timm_versions),
                 "confidence": c.confidence, "score": c.score}
                for c in self.alternatives
            ],
            "installed_timm": self.installed_timm,
            "loads_as_is": self.loads_as_is,
            "as_is_problem": self.as_is_problem,
        }


def inspect_file(path: str | Path, target: Target, *, catalog: Catalog | None = None, ema: bool = False) -> Report:
    catalog = catalog or Catalog.load()
    ckpt = read(path, ema=ema)
    tag = identify(ckpt, catalog)
    best = tag.best
    try:
        choice = target_model(tag, ckpt, target, catalog, None)
        spec = target.describe(choice.name, choice.kwargs)
        mismatch = strict_check(ckpt.tensors, spec.layout)
        name, loads, problem = choice.name, mismatch.ok, None if mismatch.ok else mismatch.describe()
    except CachectlError as exc:
        name, loads, problem = None, False, str(exc)
    return Report(
        file=ckpt.path, format=ckpt.format, size=ckpt.size, tensors=len(ckpt.layout.tensors),
        parameters=sum(s.numel for _, s in ckpt.layout.tensors), container=ckpt.container,
        other_containers=ckpt.other_containers, stripped_prefix=ckpt.stripped_prefix,
        layout=ckpt.layout.layout_id, architecture=name, source_architecture=best.architecture,
        timm_versions=best.timm_versions, confidence=best.confidence, score=best.score,
        num_classes=best.num_classes, chosen_by=tag.chosen_by, alternatives=tag.alternatives,
        installed_timm=target.info().timm, loads_as_is=loads, as_is_problem=problem,
    )
