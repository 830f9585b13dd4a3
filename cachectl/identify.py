"""Which architecture and which timm releases produced a checkpoint.

Evidence, strongest first: the layout catalog (exact layout; exact but for the
classifier; partial), then, between architectures that share a layout, what the file
says of itself (cachectl metadata, config.json, a training checkpoint's `arch`, the hub
repo name) and finally its file name.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from .catalog import Catalog, ModelEntry, version_key
from .errors import IdentifyError
from .layout import Layout, is_under
from .reader import Checkpoint

EXACT = "exact"
EXACT_BUT_CLASSIFIER = "exact-but-classifier"
PARTIAL = "partial"
PARTIAL_FLOOR = 0.5  # below this share of matching tensors a guess is noise


@dataclass(frozen=True)
class Candidate:
    architecture: str  # the name in the producing releases
    timm_versions: tuple[str, ...]  # catalogued releases that produce this layout
    confidence: str  # exact | exact-but-classifier | partial
    score: float  # share of (key, shape) pairs that match, 1.0 when exact
    num_classes: int | None
    family: str
    layout_index: int
    classifier: tuple[str, ...]


@dataclass(frozen=True)
class Tag:
    best: Candidate
    alternatives: tuple[Candidate, ...]
    chosen_by: str  # what decided between candidates sharing the layout


def identify(ckpt: Checkpoint, catalog: Catalog) -> Tag:
    layout = ckpt.layout
    if not layout.tensors:
        raise IdentifyError(ckpt.path, "holds no tensors", "Point cachectl at a file with model weights.")
    candidates = _exact(layout, catalog) or _but_classifier(layout, catalog) or _partial(layout, catalog)
    if not candidates:
        raise IdentifyError(
            ckpt.path, "matches no architecture of timm %s" % ", ".join(catalog.releases),
            "If it is a timm model from a newer release, add that release to the catalog "
            "(python -m tools.build_catalog VERSION); otherwise it is not a timm checkpoint.",
        )
    ranked, chosen_by = _rank(candidates, ckpt)
    return Tag(best=ranked[0], alternatives=tuple(ranked[1:]), chosen_by=chosen_by)


def _group(entries: list[ModelEntry], confidence: str, score: float, num_classes_of) -> list[Candidate]:
    by_name: dict[tuple, list[ModelEntry]] = defaultdict(list)
    for e in entries:
        by_name[(e.name, e.layout_index)].append(e)
    out = []
    for (name, idx), group in by_name.items():
        first = group[0]
        versions = tuple(sorted({e.release for e in group}, key=version_key))
        out.append(Candidate(name, versions, confidence, score, num_classes_of(first), first.family, idx, first.classifier))
    return out


def _classifier_classes(layout: Layout, classifier: tuple[str, ...]) -> int | None:
    """num_classes as the checkpoint's own classifier says: 0 when it has none."""
    if not classifier:
        return None
    heads = [s for k, s in layout.tensors if is_under(k, classifier) and k.endswith("weight")]
    return heads[0].shape[0] if heads else 0


def _exact(layout: Layout, catalog: Catalog) -> list[Candidate]:
    entries = catalog.by_layout(layout.layout_id)
    return _group(entries, EXACT, 1.0, lambda e: _classifier_classes(layout, e.classifier) if e.classifier else e.default_num_classes)


def _but_classifier(layout: Layout, catalog: Catalog) -> list[Candidate]:
    out = []
    for spec in catalog.classifier_specs():
        body = layout.without(spec)
        entries = catalog.by_body(spec, body.layout_id)
        if entries and _head_fits(layout, catalog.layout(entries[0].layout_index), spec):
            out += _group(entries, EXACT_BUT_CLASSIFIER, 1.0, lambda e: _classifier_classes(layout, spec))
    return out


def _head_fits(layout: Layout, reference: Layout, spec: tuple[str, ...]) -> bool:
    """Classifier tensors differ from the reference's only in their class dimension."""
    ours = {k: s.shape for k, s in layout.tensors if is_under(k, spec)}
    theirs = {k: s.shape for k, s in reference.tensors if is_under(k, spec)}
    if not ours:
        return True  # saved without a head: num_classes=0
    if set(ours) != set(theirs):
        return False
    return all(len(ours[k]) == len(theirs[k]) and ours[k][1:] == theirs[k][1:] for k in ours)


def _partial(layout: Layout, catalog: Catalog) -> list[Candidate]:
    pairs = frozenset((k, s.shape) for k, s in layout.tensors)
    names = frozenset(k for k, _ in layout.tensors)
    scored = []
    for idx, key_set in catalog.layout_key_sets():
        # cheap screen on key names before the exact (key, shape) score
        if len(names & {k for k, _ in key_set}) < PARTIAL_FLOOR * len(names):
            continue
        score = len(pairs & key_set) / len(pairs | key_set)
        if score >= PARTIAL_FLOOR:
            scored.append((score, idx))
    scored.sort(reverse=True)
    out = []
    for score, idx in scored[:5]:
        entries = [e for r in catalog.releases for e in catalog.models(r).values() if e.layout_index == idx]
        out += _group(entries, PARTIAL, round(score, 4), lambda e: _classifier_classes(layout, e.classifier) if e.classifier else None)
    return out


def _tokens(text: str) -> set[str]:
    return {t for t in re.split(r"[^a-z0-9]+", text.lower()) if t}


def _rank(candidates: list[Candidate], ckpt: Checkpoint) -> tuple[list[Candidate], str]:
    hint = ckpt.hints.architecture
    hint_base = hint.split(".")[0] if hint else None
    stem = ckpt.path.name
    for suffix in (".safetensors", ".tar", ".pth", ".pt", ".bin", ".ckpt"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    stem_tokens = _tokens(stem) | (_tokens(ckpt.hints.repo_id) if ckpt.hints.repo_id else set())

    def key(c: Candidate):
        named = hint_base is not None and c.architecture == hint_base
        in_stem = c.architecture in stem or (ckpt.hints.repo_id or "").endswith("/" + c.architecture)
        overlap = len(_tokens(c.architecture) & stem_tokens) / max(1, len(_tokens(c.architecture)))
        newest = tuple(-x for x in version_key(c.timm_versions[-1]))
        return (-c.score, not named, not in_stem, -overlap, -len(c.timm_versions), newest, c.architecture)

    ranked = sorted(candidates, key=key)
    if len(ranked) == 1 or ranked[0].score > ranked[1].score:
        return ranked, "the layout"
    top = ranked[0]
    if hint_base == top.architecture:
        return ranked, ckpt.hints.architecture_source or "the file's metadata"
    if key(top)[2:4] != key(ranked[1])[2:4]:
        return ranked, "the file name"
    return ranked, "a tie (alphabetical); pass --model to choose"
