"""Which architecture and which timm releases produced a checkpoint.

Evidence, strongest first: the layout catalog (exact layout; exact but for the
classifier; partial), then, between architectures that share a layout, what the file
says of itself (cachectl metadata, config.json, a training checkpoint's `arch`, the hub
repo name) and finally its file name, matched by whole tokens, the longest exact name
first. Candidates that nothing in the file tells apart and that may compute differently
make the answer `ambiguous`: conversion then asks for `--model` instead of guessing.

A timm model inside a larger one (`backbone.`, `pretrained.model.`, a teacher and a
student) is found under its prefix: `find` answers one tag per model found and the keys
that belong to none of them.
"""
from __future__ import annotations

import functools
import json
import re
import weakref
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .catalog import Catalog, ModelEntry, version_key
from .catalog import same_math as fingerprints_agree
from .errors import AmbiguousError, IdentifyError
from .layout import Layout, is_under
from .recent import Recent

if TYPE_CHECKING:  # a reader.Checkpoint, or the torch-free headers.Header that inspect reads
    from .reader import Checkpoint

EXACT = "exact"
EXACT_BUT_CLASSIFIER = "exact-but-classifier"
PARTIAL = "partial"
AMBIGUOUS = "ambiguous"  # a Tag's confidence when candidates that may compute differently remain
PARTIAL_FLOOR = 0.5  # below this share of matching tensors a guess is noise
PREFIX_DEPTH = 4  # how deep a wrapped timm model is looked for: `a.b.c.d.` at most
MIN_PART_TENSORS = 4  # fewer tensors than this under a prefix is not a model
SUFFIXES = (".safetensors", ".tar", ".pth", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class Candidate:
    architecture: str  # the name in the producing releases
    timm_versions: tuple[str, ...]  # releases that produce this layout for this model, across its renames
    confidence: str  # exact | exact-but-classifier | partial
    score: float  # share of (key, shape) pairs that match, 1.0 when exact
    num_classes: int | None
    family: str
    layout_index: int
    classifier: tuple[str, ...]
    registered: tuple[str, ...] = ()  # releases that register this very name with this layout


@dataclass(frozen=True)
class Tag:
    best: Candidate
    alternatives: tuple[Candidate, ...]
    chosen_by: str  # what decided between candidates sharing the layout
    # candidates nothing in the file ruled out that may compute differently from `best`
    ambiguous: tuple[Candidate, ...] = ()
    prefix: str = ""  # where this model's keys start in the state dict; "" when it is all of it

    @property
    def confidence(self) -> str:
        return AMBIGUOUS if self.ambiguous else self.best.confidence

    def refuse_if_ambiguous(self, subject) -> None:
        """AmbiguousError naming the look-alikes, when the file does not say which it is."""
        if not self.ambiguous:
            return
        names = [self.best.architecture] + [c.architecture for c in self.ambiguous]
        where = " under %s" % self.prefix if self.prefix else ""
        raise AmbiguousError(
            subject,
            "the model%s could be any of %s: they share every key and shape but may compute "
            "differently, and nothing in the file (metadata, config, training args, name) says which"
            % (where, ", ".join(names)),
            "Say which with --model NAME (one of %s)." % ", ".join(names),
        )


@dataclass(frozen=True)
class Found:
    """The timm models in a checkpoint: all of it, or parts of a larger model."""

    tags: tuple[Tag, ...]
    passthrough: tuple[str, ...] = ()  # keys outside every timm model, kept unchanged

    @property
    def wrapped(self) -> bool:
        return any(t.prefix for t in self.tags)


def identify(ckpt: Checkpoint, catalog: Catalog, *, model: str | None = None) -> Tag:
    """The tag of a checkpoint that is one timm model, keys at the top level."""
    if not ckpt.layout.tensors:
        raise IdentifyError(ckpt.path, "holds no tensors", "Point cachectl at a file with model weights.")
    tag = _identify_layout(ckpt.layout, ckpt, catalog, model, "", partial=True)
    if tag is None:
        raise _no_match(ckpt, catalog)
    return tag


# Answers of find by what they depend on: the layout object (a safetensors header seen
# before is parsed once, reader.py, so files of one architecture saved alike share it),
# the file's name and hints, the catalog object and the question. The daemon identifies a
# file when it is added, then again in each environment's conversion, and a cluster's
# files are mostly a few architectures. Layout and catalog are held weakly: never what
# keeps them alive; an answer whose layout or catalog is gone is not reused.
_ANSWERS: "Recent[tuple]" = Recent(64)


def find(ckpt: Checkpoint, catalog: Catalog, *, model: str | None = None,
         prefixes: tuple[str, ...] | None = None) -> Found:
    """Every timm model in the checkpoint: the whole state dict, else under prefixes.

    `prefixes` says where the models are (as the file names its keys); without it they
    are looked for: the whole state dict (exactly, else in part), then every prefix up to
    PREFIX_DEPTH deep, outermost first.
    """
    h = ckpt.hints
    key = (id(ckpt.layout), id(catalog), ckpt.path.name, ckpt.stripped_prefix, model,
           None if prefixes is None else tuple(prefixes),
           h.architecture, h.architecture_source, h.num_classes, h.repo_id, tuple(sorted(h.cachectl.items())))
    known = _ANSWERS.get(key)
    if known is not None and known[0]() is ckpt.layout and known[1]() is catalog:
        return known[2]
    found = _find(ckpt, catalog, model, prefixes)
    _ANSWERS.put(key, (weakref.ref(ckpt.layout), weakref.ref(catalog), found))
    return found


def _find(ckpt: Checkpoint, catalog: Catalog, model: str | None, prefixes: tuple[str, ...] | None) -> Found:
    layout = ckpt.layout
    if not layout.tensors:
        raise IdentifyError(ckpt.path, "holds no tensors", "Point cachectl at a file with model weights.")
    if prefixes:
        return _at_prefixes(ckpt, catalog, model, prefixes)
    # a whole model, even one that matches only in part (a newer release's), before parts:
    # a hybrid's backbone is a catalogued model too, but it is not what the file is
    whole = _identify_layout(layout, ckpt, catalog, model, "", partial=True)
    if whole is not None:
        return Found((whole,))
    parts = _search_prefixes(ckpt, catalog, model)
    if parts:
        inside = tuple(t.prefix for t in parts)
        return Found(parts, tuple(k for k in layout.keys if not k.startswith(inside)))
    raise _no_match(ckpt, catalog)


def _no_match(ckpt: Checkpoint, catalog: Catalog) -> IdentifyError:
    return IdentifyError(
        ckpt.path, "matches no architecture of timm %s, neither as a whole nor under any prefix of its keys"
        % ", ".join(catalog.releases),
        "If a timm model sits inside it with extra keys of its own, say where with --prefix "
        "(e.g. --prefix backbone.); if it is a timm model from a newer release, add that release "
        "to the catalog (cachectl catalog build VERSION); otherwise it is not a timm checkpoint.",
    )


def sub_layout(layout: Layout, prefix: str) -> Layout:
    """The keys under `prefix`, with the prefix taken off."""
    return Layout(tuple((k[len(prefix):], s) for k, s in layout.tensors if k.startswith(prefix)))


def part_of(ckpt: Checkpoint, prefix: str) -> Checkpoint:
    """The checkpoint seen from `prefix`: its keys under it, the prefix taken off."""
    if not prefix:
        return ckpt
    tensors = {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
    return replace(ckpt, layout=sub_layout(ckpt.layout, prefix), tensors=tensors)


def _normal_prefix(ckpt: Checkpoint, prefix: str) -> str:
    """A --prefix as the user wrote it, in the key names the reader kept."""
    prefix = prefix if not prefix or prefix.endswith(".") else prefix + "."
    if ckpt.stripped_prefix and prefix.startswith(ckpt.stripped_prefix) and not any(
            k.startswith(prefix) for k in ckpt.layout.keys):
        prefix = prefix[len(ckpt.stripped_prefix):]
    return prefix


def _at_prefixes(ckpt: Checkpoint, catalog: Catalog, model: str | None, prefixes) -> Found:
    tags = []
    for given in prefixes:
        prefix = _normal_prefix(ckpt, given)
        sub = sub_layout(ckpt.layout, prefix) if prefix else ckpt.layout
        if not sub.tensors:
            raise IdentifyError(ckpt.path, "has no keys under %s" % given,
                                "Give a prefix its keys start with (cachectl inspect lists them).")
        tag = _identify_layout(sub, ckpt, catalog, model, prefix, partial=True)
        if tag is None:
            raise IdentifyError(ckpt.path, "what lies under %s matches no timm architecture" % (given or "the top level"),
                                "Check the prefix; the keys there start with %s." % sub.keys[0])
        tags.append(tag)
    inside = tuple(t.prefix for t in tags)
    if "" in inside:
        return Found(tuple(tags))
    return Found(tuple(tags), tuple(k for k in ckpt.layout.keys if not k.startswith(inside)))


def _search_prefixes(ckpt: Checkpoint, catalog: Catalog, model: str | None) -> tuple[Tag, ...]:
    counts: dict[str, int] = defaultdict(int)
    for key in ckpt.layout.keys:
        parts = key.split(".")
        for depth in range(1, min(PREFIX_DEPTH, len(parts) - 1) + 1):
            counts[".".join(parts[:depth]) + "."] += 1
    known = _catalog_keys(catalog)
    found: list[Tag] = []
    for prefix in sorted(counts, key=lambda p: (p.count("."), p)):
        if counts[prefix] < MIN_PART_TENSORS or any(prefix.startswith(t.prefix) for t in found):
            continue
        sub = sub_layout(ckpt.layout, prefix)
        # a cheap screen before hashing: most keys under a timm model are keys timm uses
        if sum(k in known for k in sub.keys) < 0.9 * len(sub.tensors):
            continue
        tag = _identify_layout(sub, ckpt, catalog, model, prefix, partial=False)
        if tag is not None:
            found.append(tag)
    return tuple(found)


@functools.lru_cache(maxsize=4)
def _catalog_keys(catalog: Catalog) -> frozenset[str]:
    return frozenset(k for _, key_set in catalog.layout_key_sets() for k, _ in key_set)


def _identify_layout(layout: Layout, ckpt: Checkpoint, catalog: Catalog, model: str | None,
                     prefix: str, *, partial: bool) -> Tag | None:
    # an exact match needs the index only; the catalog's layouts (2 s, 300 MB to read) are
    # read only when there is none
    candidates = list(_exact_across_renames(layout, catalog))
    if not candidates and len(layout.tensors) * PARTIAL_FLOOR > catalog.largest_layout():
        # no catalogued model has this many tensors, nor matches a share of them: said at
        # once, not after a pass over all of them per classifier (100,000 tensors: seconds)
        return None
    if not candidates:
        candidates = _but_classifier(layout, catalog)
        if not candidates and partial:
            candidates = _partial(layout, catalog)
        if not candidates:
            return None
        candidates = _across_renames(candidates, layout, catalog)
    return _decide(candidates, ckpt, catalog, model, prefix)


def _exact_across_renames(layout: Layout, catalog: Catalog) -> tuple[Candidate, ...]:
    # once per layout and catalog: a cluster's files are mostly a few architectures saved
    # again and again, and the exact candidates (about 2 ms to gather) read of a file only
    # its keys and shapes
    def gather() -> tuple[Candidate, ...]:
        candidates = _exact(layout, catalog)
        return tuple(_across_renames(candidates, layout, catalog)) if candidates else ()
    return catalog.remember(("exact", layout.layout_id), gather)


def _group(entries: list[ModelEntry], confidence: str, score: float, num_classes_of) -> list[Candidate]:
    by_name: dict[tuple, list[ModelEntry]] = defaultdict(list)
    for e in entries:
        by_name[(e.name, e.layout_index)].append(e)
    out = []
    for (name, idx), group in by_name.items():
        first = group[0]
        versions = tuple(sorted({e.release for e in group}, key=version_key))
        out.append(Candidate(name, versions, confidence, score, num_classes_of(first), first.family, idx,
                             first.classifier, versions))
    return out


def _classifier_classes(layout: Layout, classifier: tuple[str, ...]) -> int | None:
    """num_classes as the checkpoint's own classifier says: 0 when it has none."""
    if not classifier:
        return None
    heads = [s for k, s in layout.tensors if is_under(k, classifier) and k.endswith("weight")]
    return heads[0].shape[0] if heads else 0


def _exact(layout: Layout, catalog: Catalog) -> list[Candidate]:
    entries = catalog.by_layout(layout.layout_id)
    classes = functools.cache(lambda classifier: _classifier_classes(layout, classifier))  # entries share a few
    return _group(entries, EXACT, 1.0, lambda e: classes(e.classifier) if e.classifier else e.default_num_classes)


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


# -- renames: timm's deprecation tables ----------------------------------------------------


@functools.lru_cache(maxsize=4)
def _renames(catalog: Catalog) -> tuple[dict[str, list[tuple[str, str]]], dict[str, set[str]]]:
    """({old name: [(release, new name with tag)]}, {new base name: {old names}})."""
    forward: dict[str, list[tuple[str, str]]] = defaultdict(list)
    backward: dict[str, set[str]] = defaultdict(set)
    for release in catalog.releases:
        for old, new in catalog.deprecated(release).items():
            forward[old].append((release, new))
            backward[new.split(".")[0]].add(old)
    return dict(forward), dict(backward)


@functools.lru_cache(maxsize=256)
def _body_id(catalog: Catalog, index: int, spec: tuple[str, ...]) -> str:
    return catalog.layout(index).without(spec).layout_id


def _made_under_old_name(catalog: Catalog, c: Candidate, release: str, new: str) -> bool:
    """Does `timm.create_model(c.architecture)` in `release`, where the name is deprecated
    to `new`, save the layout of candidate `c`?"""
    base, _, tag = new.partition(".")
    entry = catalog.model(release, base)
    if entry is None:
        return False
    if entry.layout_index == c.layout_index:
        return True
    # the deprecated name builds `base` with the tag's num_classes: same body, that head
    spec = entry.classifier
    if not spec:
        return False
    classes = {t.tag: t.num_classes for t in catalog.tags(release, base)}.get(tag)
    reference = catalog.layout(c.layout_index)
    return (classes is not None and _body_id(catalog, entry.layout_index, spec) == _body_id(catalog, c.layout_index, spec)
            and _classifier_classes(reference, spec) == classes)


def _across_renames(candidates: list[Candidate], layout: Layout, catalog: Catalog) -> list[Candidate]:
    """Each candidate's releases, counted across its renames: the releases where its
    (deprecated) name still builds this layout, and those of the names it was renamed
    to or from that share the layout."""
    forward, _ = _renames(catalog)
    extended = []
    for c in candidates:
        extra = {r for r, new in forward.get(c.architecture, ()) if _made_under_old_name(catalog, c, r, new)}
        extended.append(replace(c, timm_versions=_sorted(set(c.timm_versions) | extra)))
    groups = _rename_groups(catalog, [c.architecture for c in extended])
    versions: dict[int, set[str]] = defaultdict(set)
    for c in extended:
        versions[groups[c.architecture]] |= set(c.timm_versions)
    return [replace(c, timm_versions=_sorted(versions[groups[c.architecture]])) for c in extended]


def _rename_groups(catalog: Catalog, names: list[str]) -> dict[str, int]:
    """Names (all of one layout) joined when timm's tables rename one into another."""
    forward, _ = _renames(catalog)
    parent = {n: n for n in names}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in names:
        for _, new in forward.get(n, ()):
            base = new.split(".")[0]
            if base in parent:
                parent[root(n)] = root(base)
    roots = {}
    return {n: roots.setdefault(root(n), len(roots)) for n in names}


def _sorted(versions) -> tuple[str, ...]:
    return tuple(sorted(versions, key=version_key))


# -- the same math -------------------------------------------------------------------------


def math_agrees(catalog: Catalog, a: Candidate, b: Candidate) -> bool:
    """Do `a` and `b` (candidates of one layout) compute the same from the same weights?

    The one place this is decided. Yes for one name, for names timm's own deprecation
    tables rename into each other, and where the catalog's math fingerprints agree;
    unknown counts as no.
    """
    if a.architecture == b.architecture:
        return True

    def decide() -> bool:
        groups = _rename_groups(catalog, sorted({a.architecture, b.architecture}))
        return groups[a.architecture] == groups[b.architecture] or _fingerprints_agree(catalog, a, b) is True
    return catalog.remember(("math_agrees", a, b), decide)


def _fingerprints_agree(catalog: Catalog, a: Candidate, b: Candidate) -> bool | None:
    if not (a.registered and b.registered):
        return None
    # release by release where both names exist, else each name's newest release
    pairs = [(r, r) for r in a.registered if r in b.registered] or [(a.registered[-1], b.registered[-1])]
    answers = {fingerprints_agree(catalog.fingerprint(ra, a.architecture), catalog.fingerprint(rb, b.architecture))
               for ra, rb in pairs}
    if False in answers:
        return False
    # agreeing wherever both were fingerprinted; how one name's math moves between
    # releases is the conversion's check (convert._math_by_fingerprints)
    return True if True in answers else None


# -- deciding between candidates -------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", text.lower()) if t]


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def _aliases(catalog: Catalog, name: str) -> list[str]:
    """`name`, the names it was renamed to (with their tags) and the names renamed into it."""
    forward, backward = _renames(catalog)
    return [name] + sorted({new for _, new in forward.get(name, ())} | backward.get(name, set()))


def _stem(ckpt: Checkpoint) -> str:
    stem = ckpt.path.name
    for suffix in SUFFIXES:
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    return stem


def _hint(ckpt: Checkpoint, prefix: str) -> tuple[str | None, str | None]:
    """The model name the file gives for the part at `prefix`, and where it says so."""
    parts = ckpt.hints.cachectl.get("parts") if ckpt.hints.cachectl else None
    if parts:
        try:
            named = {p["prefix"]: p["model"] for p in json.loads(parts)}
        except (ValueError, TypeError, KeyError):
            named = {}
        full = ckpt.stripped_prefix + prefix
        if full in named:
            return named[full], "cachectl metadata"
    # a name for the whole file counts for a part only where it names one of its candidates
    return ckpt.hints.architecture, ckpt.hints.architecture_source


def _named(catalog: Catalog, c: Candidate, name: str) -> int:
    """2 when `name` is the candidate's own, 1 when one of its aliases, 0 otherwise."""
    base = name.split(".")[0]
    if base == c.architecture:
        return 2
    return 1 if base in {a.split(".")[0] for a in _aliases(catalog, c.architecture)} else 0


def _name_match(catalog: Catalog, c: Candidate, tokens: list[str]) -> tuple[int, int]:
    """(tokens of the longest of the candidate's names found whole in `tokens`, 1 if it is its own name)."""
    best = (0, 0)
    for i, alias in enumerate(_aliases(catalog, c.architecture)):
        t = _tokens(alias)
        if _contains(tokens, t):
            best = max(best, (len(t), int(i == 0)))
    return best


def _decide(candidates: list[Candidate], ckpt: Checkpoint, catalog: Catalog, model: str | None, prefix: str) -> Tag:
    top = max(c.score for c in candidates)
    contenders = [c for c in candidates if c.score == top]
    others = sorted((c for c in candidates if c.score != top), key=lambda c: -c.score)

    def general(c: Candidate):
        newest = tuple(-x for x in version_key(c.registered[-1])) if c.registered else ()
        return (-len(c.timm_versions), newest, c.architecture)

    chosen_by = "the layout"
    hint, hint_source = _hint(ckpt, prefix)
    tokens = _tokens(_stem(ckpt)) + (_tokens(ckpt.hints.repo_id) if ckpt.hints.repo_id else [])
    if model:
        # the user's word; a name of no candidate is still what the target builds
        named = [c for c in contenders if _named(catalog, c, model)] or contenders
        contenders = sorted(named, key=lambda c: (-_named(catalog, c, model),) + general(c))
        chosen_by = "--model"
    elif hint and any(_named(catalog, c, hint) for c in contenders):
        contenders = sorted((c for c in contenders if _named(catalog, c, hint)),
                            key=lambda c: (-_named(catalog, c, hint),) + general(c))
        chosen_by = hint_source or "the file's metadata"
    else:
        matches = {c: _name_match(catalog, c, tokens) for c in contenders}
        longest = max(m[0] for m in matches.values())
        if longest:
            named = [c for c in contenders if matches[c][0] == longest]
            if len(named) < len(contenders):
                chosen_by = "the file name"
            contenders = sorted(named, key=lambda c: (-matches[c][1],) + general(c))
        else:
            contenders.sort(key=general)
    best = contenders[0]
    rest = tuple(contenders[1:]) + tuple(c for c in candidates if c not in contenders and c not in others) + tuple(others)
    ambiguous = () if model else tuple(c for c in contenders[1:] if not math_agrees(catalog, best, c))
    if ambiguous:
        chosen_by = "nothing in the file: pass --model NAME"
    elif len(contenders) > 1 and chosen_by == "the layout":
        chosen_by = "the layout (the other names compute the same)"
    return Tag(best=best, alternatives=rest, chosen_by=chosen_by, ambiguous=ambiguous, prefix=prefix)
