"""Plan and run one conversion: a checkpoint, made for the timm of one target, proven strict.

Plans are tried in order and the first whose result passes the strict check against
the target model wins: the file as it is, the project's migrations for the family, then
the target timm's own checkpoint filter. Each plan ends with the same two generic steps:
drop what the target no longer saves (non-persistent buffers), fill the deterministic
buffers it does save from a fresh target model.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from . import __version__, migrations, proof
from ._fingerprint import DERIVED_BUFFERS
from .catalog import Catalog, Fingerprint, name_candidates, version_key
from .catalog import same_math as fingerprints_agree
from .errors import NoPlanError, TargetError, few
from .identify import Tag, find, math_agrees, part_of
from .layout import Layout, layout_id
from .reader import Checkpoint, read
from .safetensors_io import Recipe, write
from .store import sha256_file
from .target import ModelSpec, Target

# Buffers a fresh model cannot supply: they are learned (batch-norm statistics).
LEARNED_BUFFERS = ("running_mean", "running_var")


@dataclass(frozen=True)
class ModelChoice:
    """`timm.create_model(name, **kwargs)` in the target loads the output strictly."""

    name: str
    kwargs: Mapping[str, object]


@dataclass(frozen=True)
class Mismatch:
    missing: tuple[str, ...]  # the target wants these, the result lacks them
    unexpected: tuple[str, ...]  # the result has these, the target does not want them
    shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # key, ours, target's

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shapes)

    def describe(self, limit: int = 6) -> str:
        parts = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                parts.append("%s %s" % (label, few(items, limit)))
        if self.shapes:
            shown = ["%s %s vs %s" % (k, list(a), list(b)) for k, a, b in self.shapes[:limit]]
            parts.append("shape %s" % "; ".join(shown))
        return "; ".join(parts)


@dataclass(frozen=True)
class Part:
    """One timm model converted inside a larger state dict (a wrapped checkpoint)."""

    prefix: str  # its keys' prefix, the same in the source and the output
    tag: Tag
    model: ModelChoice
    steps: tuple[str, ...]


@dataclass(frozen=True)
class Conversion:
    source: Path
    output: Path
    source_sha256: str
    source_timm_versions: tuple[str, ...]
    target_timm: str
    model: ModelChoice
    steps: tuple[str, ...]
    tag: Tag = field(compare=False)
    size: int = 0
    container: str | None = None  # where in the file the weights were, e.g. state_dict_ema
    other_containers: tuple[str, ...] = ()
    parts: tuple[Part, ...] = ()  # a wrapped checkpoint: each timm model in it
    passthrough: int = 0  # keys outside every timm model, written back unchanged
    recipe: Recipe | None = None  # how the output is made of the source, given the source's sha256
    source_runs: int = 0  # stretches of the source copied unchanged, each read once


@dataclass(frozen=True)
class _Attempt:
    name: str
    steps: tuple[str, ...]
    state: Mapping[str, torch.Tensor] = field(repr=False)
    mismatch: Mismatch


def strict_check(state: Mapping[str, torch.Tensor], layout: Layout, known: Layout | None = None) -> Mismatch:
    """What keeps `state` from loading strictly into a model of `layout`. `known`: the
    layout of `state` itself where it is known (a file's own tensors, from its header), so
    that no tensor is built to see its shape."""
    if known is not None and known.layout_id == layout.layout_id:
        return Mismatch((), (), ())  # the same keys and shapes: both ids are computed once per layout
    want = layout.specs
    have = known.specs if known is not None else None

    def shape(k: str) -> tuple[int, ...]:
        return have[k].shape if have is not None else tuple(state[k].shape)
    missing = tuple(k for k in want if k not in state)
    unexpected = tuple(sorted(k for k in state if k not in want))
    shapes = tuple((k, shape(k), want[k].shape) for k in want if k in state and shape(k) != want[k].shape)
    return Mismatch(missing, unexpected, shapes)


def target_model(tag: Tag, ckpt: Checkpoint, target: Target, catalog: Catalog, override: str | None) -> ModelChoice:
    """The name and kwargs to build in the target for this checkpoint."""
    best = tag.best
    names = [override] if override else name_candidates(catalog, best.architecture, ckpt.hints.architecture)
    for candidate in names:
        resolved = target.resolve_name(candidate)
        if resolved:
            break
    else:
        raise NoPlanError(
            ckpt.path, "timm %s has no model %s" % (target.info().timm, " or ".join(names)),
            "Convert for an environment with a timm release that has it, or pass --model NAME.",
        )
    kwargs: dict[str, object] = {}
    if best.num_classes is not None:
        kwargs["num_classes"] = best.num_classes
    return ModelChoice(resolved, kwargs)


def _model_choices(tag: Tag, ckpt: Checkpoint, target: Target, catalog: Catalog, override: str | None):
    """The models to try in the target, best first: the identified one, then (without
    --model) the look-alikes that compute the same, for when timm's deprecation table
    maps a name to a model of another layout (ig_resnext101_32x16d -> resnext101_32x8d)."""
    first_error = None
    seen = set()
    ranked = [tag.best] + ([] if override else [
        c for c in tag.alternatives if c.score == tag.best.score and math_agrees(catalog, tag.best, c)])
    for candidate in ranked:
        try:
            choice = target_model(dataclasses.replace(tag, best=candidate), ckpt, target, catalog, override)
        except NoPlanError as exc:
            first_error = first_error or exc
            continue
        if choice.name not in seen:
            seen.add(choice.name)
            yield choice
    if not seen and first_error:
        raise first_error


def _finish(state: Mapping[str, torch.Tensor], spec: ModelSpec, target: Target, steps: list[str]) -> tuple[Mapping, list[str]]:
    """Drop what the target does not save; fill the deterministic buffers it does save."""
    want = spec.layout.specs
    dropped = [k for k in state if k not in want and _is_buffer_name(k, spec)]
    if dropped:
        state = {k: v for k, v in state.items() if k not in dropped}
        steps = steps + ["drop %d buffers the target does not save" % len(dropped)]
    fill = [k for k in want if k not in state and k in spec.buffers and not k.endswith(LEARNED_BUFFERS)]
    if fill:
        values = target.buffer_values(spec, fill)
        state = {**state, **values}
        steps = steps + ["fill %d buffers from a fresh target model" % len(fill)]
    return state, steps


def _is_buffer_name(key: str, spec: ModelSpec) -> bool:
    # A key the target does not save is droppable only if it names a buffer the target
    # recomputes: the same leaf name as one of its buffers, or a known derived table.
    leaf = key.rsplit(".", 1)[-1]
    derived = ("relative_position_index", "attn_mask", "relative_coords_table", "attention_bias_idxs",
               "rel_pos_idx", "k_pos_idx", "pos_embed_index")
    return leaf in derived or any(b.rsplit(".", 1)[-1] == leaf for b in spec.buffers if leaf not in ("weight", "bias"))


def _plans(ckpt: Checkpoint, spec: ModelSpec, target: Target) -> list[tuple[str, Callable[[], tuple[Mapping, list[str]]]]]:
    # as-is hands on the file's own mapping: a file that loads as it is builds no tensor
    # it does not need; the other plans get a dict of their own, which timm's filters may change
    plans: list[tuple[str, Callable[[], tuple[Mapping, list[str]]]]] = [("as-is", lambda: (ckpt.tensors, []))]
    applicable = migrations.applicable(spec.family, ckpt.tensors, spec.layout.keys)
    if applicable:
        def migrate():
            state, steps = dict(ckpt.tensors), []
            for m, direction in applicable:
                state = (m.upgrade if direction == "upgrade" else m.downgrade)(state)
                steps.append("migration %s.%s (%s)" % (m.family, m.name, direction))
            return state, steps
        plans.append(("migrations", migrate))

    def own_filter():
        state, name = target.apply_filter(spec, dict(ckpt.tensors))
        if state is None:
            return None, ["target filter: %s" % name]
        return state, ["target timm %s filter %s" % (target.info().timm, name)]
    plans.append(("target filter", own_filter))
    return plans


def _refuse_known_changes(ckpt: Checkpoint, tag: Tag, spec: ModelSpec, target_timm: str) -> None:
    """NoPlanError where a hand-written table in cachectl/migrations says the model
    computes differently in the target than in the releases that made the file. The
    tables stay in force everywhere (the suite proves the fingerprints confirm them)."""
    # asked by either name: the target may know the model by a newer one
    names = {spec.name.split(".")[0], tag.best.architecture}
    changes = {c for n in names for c in migrations.math_changes(spec.family, n)}
    for change in sorted(changes, key=lambda c: c.first):
        span = (version_key(change.first), version_key(change.last))
        sides = {span[0] <= version_key(v) <= span[1] for v in tag.best.timm_versions}
        if len(sides) == 1 and (span[0] <= version_key(target_timm) <= span[1]) not in sides:
            raise NoPlanError(
                ckpt.path, "%s computes differently in timm %s than in timm %s, which made this file: %s" % (
                    spec.name, target_timm, ", ".join(tag.best.timm_versions), change.reason),
                "Convert it for a timm release on the same side (%s to %s, or outside it)." % (change.first, change.last),
            )


def _math_by_fingerprints(ckpt: Checkpoint, tag: Tag, spec: ModelSpec, target_timm: str, catalog: Catalog,
                          run: Callable[[str, str, Fingerprint], Fingerprint | str] | None = None) -> str:
    """The step that says how the conversion's math is known ("math: ..."), or NoPlanError.

    The target must compute like every release that makes this file's layout: the file
    could come from any of them, so one that differs is a refusal, even when others agree.
    The catalog's fingerprint of the target decides where it holds the same generated
    weights as the source's; otherwise (a migration, kwargs, a target release the catalog
    lacks) `run(release, name, fingerprint)` proves it by running the conversion's plan on
    the source release's fingerprint weights in the target (cachectl/proof.py)."""
    target_name = spec.name.split(".")[0]
    extra = {k: v for k, v in spec.kwargs.items() if k != "num_classes"}
    arch = tag.best.architecture
    taken: dict[str, Fingerprint] = {}
    missing: dict[str, list[str]] = {}  # why a release has no fingerprint ("timm {}"): the releases
    for release in tag.best.timm_versions:
        name = _name_in_release(catalog, release, arch) or arch
        fp = catalog.fingerprint(release, name)
        if fp is None:
            why = catalog.why_no_fingerprint(release, name).replace("timm %s" % release, "timm {}")
            missing.setdefault(why, []).append(release)
        else:
            taken[release] = fp
    unverified = [why.format(", ".join(releases)) for why, releases in missing.items()]
    # fingerprints are of models built by default: with other kwargs only a run compares
    target_fp = None if extra else catalog.fingerprint(target_timm, target_name)
    how = "fingerprints"
    if run is not None and taken and not any(fingerprints_agree(fp, target_fp) is not None for fp in taken.values()):
        release, fp = next(iter(taken.items()))
        ran = run(release, fp.name, fp)
        if isinstance(ran, Fingerprint):
            target_fp, how = ran, "run in timm %s on the fingerprint weights of timm %s, converted" % (target_timm, release)
        else:
            unverified.append(ran)
    source: dict[str, Fingerprint] = {}
    for release, fp in taken.items():
        if fingerprints_agree(fp, target_fp) is not None:
            source[release] = fp
        elif target_fp is None:
            unverified.append(("%s is built with %s; fingerprints are of models built by default" % (target_name, _json(extra)))
                              if extra else catalog.why_no_fingerprint(target_timm, target_name))
        else:
            unverified.append("%s of timm %s holds other tensors than %s of timm %s" % (fp.name, release, target_name, target_timm))
    unverified = list(dict.fromkeys(unverified))
    differ = [r for r, fp in source.items() if not fingerprints_agree(fp, target_fp)]
    if differ:
        _refuse_by_fingerprints(ckpt, target_name, target_timm, source, differ, unverified, catalog, how)
    if not source:
        return "math: unverified (%s)" % "; ".join(unverified)
    verified = "math: %s of timm %s computes like %s of timm %s, which make this layout (%s)" % (
        target_name, target_timm, arch, ", ".join(source), how)
    return verified + ("; unverified: %s" % "; ".join(unverified) if unverified else "")


def _run_on_fingerprint_weights(ckpt: Checkpoint, plan_name: str, spec: ModelSpec, target: Target,
                                catalog: Catalog) -> Callable[[str, str, Fingerprint], Fingerprint | str]:
    """A `run` for _math_by_fingerprints: the plan `plan_name` applied to the source
    release's fingerprint weights, run in the target; the target's fingerprint, or why not."""
    def run(release: str, name: str, fp: Fingerprint) -> Fingerprint | str:
        entry = catalog.models(release).get(name)
        if entry is None:
            return "%s is not in the catalog of timm %s" % (name, release)
        layout = catalog.layout(entry.layout_index)
        why = proof.unprovable(layout, fp)
        if why:
            return why
        # the source release's default head, as its fingerprint was taken; every other kwarg as converted
        kwargs = {k: v for k, v in spec.kwargs.items() if k != "num_classes"}
        if entry.default_num_classes is not None:
            kwargs["num_classes"] = entry.default_num_classes
        try:
            run_spec = target.describe(spec.name, kwargs) if kwargs != dict(spec.kwargs) else spec
            shared = [k for k in run_spec.buffers if k in layout.specs and layout.specs[k].shape == run_spec.layout.specs[k].shape]
            as_built = target.buffer_values(run_spec, shared) if shared else {}
        except TargetError as exc:
            return "the proof cannot build %s in the target (%s)" % (spec.name, exc.problem)
        weights = proof.source_weights(layout, as_built)
        if weights.weights != fp.weights:
            return "the fingerprint weights of %s of timm %s cannot be rebuilt from its layout (tied tensors)" % (name, release)
        synthetic = dataclasses.replace(ckpt, layout=layout, tensors=weights.tensors, span=None, stripped_prefix="",
                                        container=None, other_containers=())
        state = None
        for plan_of, build in _plans(synthetic, run_spec, target):
            if plan_of == plan_name:
                state, steps = build()
                if state is not None:
                    state, _ = _finish(state, run_spec, target, steps)
        if state is None or not strict_check(state, run_spec.layout).ok:
            return "the %s plan does not carry %s of timm %s's own layout into %s" % (plan_name, name, release, spec.name)
        try:
            summary = target.run_fixed(run_spec, state, fp.input)
        except TargetError as exc:
            return "the proof run failed (%s)" % exc.problem
        return proof.as_fingerprint(summary, target.info().timm, spec.name.split(".")[0], fp)
    return run


def _refuse_by_fingerprints(ckpt: Checkpoint, target_name: str, target_timm: str, source: dict[str, Fingerprint],
                            differ: list[str], unverified: list[str], catalog: Catalog, how: str) -> None:
    # the producing releases, grouped by what they compute
    groups: list[list[str]] = []
    for release, fp in source.items():
        for group in groups:
            if fingerprints_agree(source[group[0]], fp):
                group.append(release)
                break
        else:
            groups.append([release])
    if len(groups) == 1:
        problem = "%s computes differently in timm %s than in timm %s, which made this file (math fingerprints differ: %s)" % (
            target_name, target_timm, ", ".join(source), how)
    else:
        problem = ("%s computes differently in timm %s than in timm %s; the releases that make this file's layout "
                   "compute it in %d ways (%s) and nothing in the file says which one made it (math fingerprints: %s)") % (
            target_name, target_timm, ", ".join(differ), len(groups), " | ".join(", ".join(g) for g in groups), how)
    if unverified:
        problem += "; unverified: %s" % "; ".join(unverified)
    advice = []
    for group in groups:
        fits = [r for r in catalog.fingerprinted_releases
                if fingerprints_agree(catalog.fingerprint(r, _name_in_release(catalog, r, target_name) or target_name), source[group[0]])]
        where = ("convert it for timm %s" % ", ".join(fits)) if fits else "no catalogued timm release computes it the same way"
        advice.append(where if len(groups) == 1 else "if timm %s made it, %s" % (", ".join(group), where))
    advice_text = "; ".join(advice)
    if len(groups) > 1:
        advice_text += "; say which release saved it with --source-timm VERSION"
    raise NoPlanError(ckpt.path, problem, advice_text[0].upper() + advice_text[1:] + ".")


def _name_in_release(catalog: Catalog, release: str, name: str) -> str | None:
    """The name `release` knows the model `name` by, following its deprecation table both ways."""
    base = name.split(".")[0]
    models = catalog.models(release) if release in catalog.releases else {}
    if base in models:
        return base
    newer = catalog.deprecated(release).get(base, "").split(".")[0] if release in catalog.releases else ""
    if newer in models:
        return newer
    for other in catalog.releases:
        for old, new in catalog.deprecated(other).items():
            if new.split(".")[0] == base and old in models:
                return old
    return None


def plan(ckpt: Checkpoint, spec: ModelSpec, target: Target) -> _Attempt:
    """The first plan whose result loads strictly into `spec`; NoPlanError if none does."""
    attempts = []
    for name, build in _plans(ckpt, spec, target):
        try:
            state, steps = build()
        except TargetError as exc:
            attempts.append((name, "failed: %s" % exc))
            continue
        if state is None:
            attempts.append((name, steps[0]))
            continue
        state, steps = _finish(state, spec, target, steps)
        mismatch = strict_check(state, spec.layout, ckpt.layout if state is ckpt.tensors else None)
        if mismatch.ok:
            return _Attempt(name, tuple(steps) + ("strict check against %s in timm %s" % (spec.name, target.info().timm),), state, mismatch)
        attempts.append((name, mismatch.describe()))
    raise NoPlanError(
        ckpt.path,
        "no plan loads strictly into %s of timm %s: %s" % (
            spec.name, target.info().timm, " | ".join("%s: %s" % a for a in attempts)),
        "If the file is another model's, pass --model NAME; otherwise this layout change "
        "needs a migration in cachectl/migrations/.",
    )


@dataclass(frozen=True)
class Prepared:
    """A conversion planned and checked, not yet written."""

    ckpt: Checkpoint = field(repr=False)
    tag: Tag
    model: ModelChoice
    target_layout: str  # layout id of the target model: outputs with equal ids are interchangeable
    target_timm: str
    attempt: _Attempt = field(repr=False)
    parts: tuple[Part, ...] = ()  # a wrapped checkpoint: each timm model in it, converted
    passthrough: tuple[str, ...] = ()  # its other keys, written back unchanged

    @property
    def unchanged(self) -> bool:
        """The result is the source file's own bytes: safetensors, loaded as it is, with no
        tensor renamed, dropped or filled. Such a file can serve as its own conversion."""
        ckpt, state = self.ckpt, self.attempt.state
        return (ckpt.format == "safetensors" and self.attempt.name == "as-is" and not self.parts
                and not ckpt.stripped_prefix and ckpt.container is None
                and (state is ckpt.tensors or (state.keys() == ckpt.tensors.keys()
                                               and all(state[k] is ckpt.tensors[k] for k in state))))


def prepare(
    source: str | Path | Checkpoint,
    target: Target,
    *,
    catalog: Catalog | None = None,
    model: str | None = None,
    ema: bool = True,
    prefixes: tuple[str, ...] | None = None,
    source_timm: str | None = None,
) -> Prepared:
    """Read, identify and plan; the result passed the strict check against the target.

    A timm model inside a larger one (`backbone.`, `pretrained.model.`, several) is found
    under its prefix, or where `prefixes` say; only its keys are converted, each checked
    strictly against its target model, and every other key is written back unchanged.
    Look-alikes that may compute differently are refused unless `model` names one.
    `source_timm` says which timm release made the file, where releases that make its
    layout compute differently; a file cachectl wrote says it itself.
    """
    catalog = catalog or Catalog.load()
    ckpt = source if isinstance(source, Checkpoint) else read(source, ema=ema)
    found = find(ckpt, catalog, model=model, prefixes=prefixes)
    for tag in found.tags:
        tag.refuse_if_ambiguous(ckpt.path)
    made_by = source_timm or ckpt.metadata.get("cachectl.target_timm")
    if made_by:
        found = dataclasses.replace(found, tags=tuple(_made_by(ckpt, tag, made_by, bool(source_timm)) for tag in found.tags))
    timm_version = target.info().timm
    if not found.wrapped:
        tag = found.tags[0]
        choice, spec, attempt = _prepare_model(ckpt, tag, target, catalog, model)
        return Prepared(ckpt, tag, choice, spec.layout.layout_id, timm_version, attempt)
    return _prepare_wrapped(ckpt, found.tags, found.passthrough, target, catalog, model)


def _made_by(ckpt: Checkpoint, tag: Tag, release: str, said: bool) -> Tag:
    """`tag` narrowed to the one release that made the file: its math is that release's."""
    if release not in tag.best.timm_versions:
        if not said:
            return tag  # cachectl's own record names a release the catalog does not know
        raise NoPlanError(ckpt.path, "timm %s does not make this layout of %s (timm %s do)" % (
            release, tag.best.architecture, ", ".join(tag.best.timm_versions)),
            "Give --source-timm one of those, the release that saved the file.")
    return dataclasses.replace(tag, best=dataclasses.replace(tag.best, timm_versions=(release,)))


def _prepare_wrapped(ckpt: Checkpoint, tags, passthrough: tuple[str, ...], target: Target, catalog: Catalog,
                     model: str | None) -> Prepared:
    """Each timm model converted under its prefix; every other key kept as it is, by name."""
    outer = ckpt.stripped_prefix  # written back: the wrapper's keys keep the file's names
    state: dict[str, torch.Tensor] = {}
    expected: list[tuple[str, tuple[int, ...]]] = []
    parts, steps = [], []
    for tag in tags:
        choice, spec, attempt = _prepare_model(part_of(ckpt, tag.prefix), tag, target, catalog, model)
        prefix = outer + tag.prefix
        state.update((prefix + k, v) for k, v in attempt.state.items())
        expected += [(prefix + k, s.shape) for k, s in spec.layout.tensors]
        parts.append(Part(prefix, tag, choice, attempt.steps))
        steps += ["under %s: %s" % (prefix, step) for step in attempt.steps]
    specs = ckpt.layout.specs
    for key in passthrough:
        if outer + key in state:
            raise NoPlanError(ckpt.path, "converting %s would overwrite its key %s" % (
                ", ".join(p.prefix for p in parts), outer + key), "Say where the timm model is with --prefix.")
        state[outer + key] = ckpt.tensors[key]
        expected.append((outer + key, specs[key].shape))
    steps.append("pass %d keys outside %s through unchanged" % (len(passthrough), ", ".join(p.prefix for p in parts)))
    attempt = _Attempt("wrapped", tuple(steps), state, Mismatch((), (), ()))
    first = parts[0]
    return Prepared(ckpt, first.tag, first.model, layout_id(expected), target.info().timm, attempt,
                    tuple(parts), passthrough)


def _prepare_model(ckpt: Checkpoint, tag: Tag, target: Target, catalog: Catalog,
                   model: str | None) -> tuple[ModelChoice, ModelSpec, _Attempt]:
    """The first model to build in the target that the file converts into, strictly."""
    first_error = None
    for choice in _model_choices(tag, ckpt, target, catalog, model):
        try:
            return _prepare_choice(ckpt, tag, choice, target, catalog)
        except NoPlanError as exc:
            first_error = first_error or exc
    raise first_error


def _prepare_choice(ckpt: Checkpoint, tag: Tag, choice: ModelChoice, target: Target,
                    catalog: Catalog) -> tuple[ModelChoice, ModelSpec, _Attempt]:
    spec = target.describe(choice.name, choice.kwargs)
    extra = migrations.kwargs_for(spec.family, ckpt.tensors, spec.layout.keys)
    if extra:
        choice = ModelChoice(choice.name, {**choice.kwargs, **extra})
        try:
            spec = target.describe(choice.name, choice.kwargs)
        except TargetError as exc:
            raise NoPlanError(
                ckpt.path, "timm %s cannot build %s with %s (%s)" % (target.info().timm, choice.name, _json(extra), exc.problem),
                "Convert it for a timm release that builds this variant.",
            )
    _refuse_known_changes(ckpt, tag, spec, target.info().timm)
    attempt = plan(ckpt, spec, target)
    run = _run_on_fingerprint_weights(ckpt, attempt.name, spec, target, catalog)

    def run_once(release: str, name: str, fp: Fingerprint) -> Fingerprint | str:
        # the proof runs the plan on generated weights, not on the file: once per model,
        # plan and release in a process, whatever the number of files
        key = _json(["proof", release, name, attempt.name, spec.name, spec.kwargs])
        return target.remember(key, lambda: run(release, name, fp))
    # the same for every file of this model, plan and target: a refusal (raised) is not kept
    info = target.info()
    math = catalog.remember(
        ("math", info.python, info.timm, tag.best.architecture, tag.best.timm_versions, attempt.name, _json([spec.name, spec.kwargs])),
        lambda: _math_by_fingerprints(ckpt, tag, spec, info.timm, catalog, run_once))
    odd = _tables_unlike_target(attempt.state, spec, target, ckpt.layout if attempt.state is ckpt.tensors else None)
    if odd and not math.startswith("math: unverified"):
        math += "; %sthe file's %s differ from the tables timm %s derives for %s, which the fingerprints and proofs use" % (
            "" if "; unverified: " in math else "unverified: ", few(odd, 3), target.info().timm, spec.name)
    attempt = _Attempt(attempt.name, attempt.steps + (math,), attempt.state, attempt.mismatch)
    return choice, spec, attempt


def _tables_unlike_target(state: Mapping[str, torch.Tensor], spec: ModelSpec, target: Target,
                          known: Layout | None = None) -> list[str]:
    """The derived tables (index tables, masks) the file hands the target whose values are
    not the ones a fresh target model derives. Fingerprints and proofs run each release on
    its own tables, so they say nothing about a file that carries other ones; across the
    catalogued releases no model's tables changed, which is what makes this check rare."""
    have = known.specs if known is not None else None  # the file's own dtypes: no tensor built to ask
    floats: dict[str, bool] = {}  # per dtype name, asked of torch once

    def floating(k: str) -> bool:
        if have is None:
            return state[k].is_floating_point()
        dtype = have[k].dtype
        if dtype not in floats:
            floats[dtype] = getattr(torch, dtype).is_floating_point
        return floats[dtype]
    present = have if have is not None else state  # the header's dict answers `in` without a Python call per key
    keys = sorted(k for k in spec.buffers if k in present and not k.endswith("num_batches_tracked")
                  and (k.rsplit(".", 1)[-1] in DERIVED_BUFFERS or not floating(k)))
    if not keys:
        return []
    own = target.buffer_values(spec, keys)
    return [k for k in keys if k in own and not (own[k].shape == state[k].shape and torch.equal(own[k], state[k].to(own[k].dtype)))]


def write_prepared(prepared: Prepared, output: Path, source_sha256: str | None = None, *,
                   sync_folder: bool = True) -> Conversion:
    """Write the planned result as safetensors with its provenance in the metadata.

    Given `source_sha256` (the store hashed the source when it took it in), the source is
    not hashed again and the output's recipe is returned, which names it without reading
    it back; without it, the source is hashed on the other core while the output is
    written. `sync_folder=False`: the caller renames the file again and syncs the folder it
    lands in."""
    ckpt, tag, choice = prepared.ckpt, prepared.tag, prepared.model
    metadata = {
        "format": "pt",
        "cachectl.version": __version__,
        "cachectl.source_name": ckpt.path.name,
        "cachectl.source_timm_versions": ",".join(tag.best.timm_versions),
        "cachectl.source_architecture": tag.best.architecture,
        "cachectl.target_timm": prepared.target_timm,
        "cachectl.model": choice.name,
        "cachectl.model_kwargs": _json(choice.kwargs),
        "cachectl.steps": _json(list(prepared.attempt.steps)),
    }
    if ckpt.container:
        metadata["cachectl.source_container"] = ckpt.container
    if prepared.parts:
        metadata["cachectl.parts"] = _json([_part_json(p) for p in prepared.parts])
        metadata["cachectl.passthrough"] = str(len(prepared.passthrough))
    state = prepared.attempt.state
    if source_sha256 is not None:
        metadata["cachectl.source_sha256"] = source_sha256
        written = write(output, state, metadata, source=ckpt.weights, span=ckpt.span, recipe=True,
                        sync_folder=sync_folder)
        digest = source_sha256
    else:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            hashing = pool.submit(sha256_file, ckpt.weights)
            written = write(output, state, metadata, deferred={"cachectl.source_sha256": hashing.result},
                            source=ckpt.weights, span=ckpt.span, sync_folder=sync_folder)
            digest = hashing.result()
    return Conversion(
        source=ckpt.path, output=output, source_sha256=digest, source_timm_versions=tag.best.timm_versions,
        target_timm=prepared.target_timm, model=choice, steps=prepared.attempt.steps, tag=tag, size=written.size,
        container=ckpt.container, other_containers=ckpt.other_containers, parts=prepared.parts,
        passthrough=len(prepared.passthrough), recipe=written.recipe, source_runs=written.source_runs,
    )


def _part_json(part: Part) -> dict:
    return {"prefix": part.prefix, "model": part.model.name, "kwargs": dict(part.model.kwargs),
            "source_architecture": part.tag.best.architecture,
            "source_timm_versions": list(part.tag.best.timm_versions)}


def convert(
    source: str | Path,
    output: str | Path | None,
    target: Target,
    *,
    catalog: Catalog | None = None,
    model: str | None = None,
    ema: bool = True,
    prefixes: tuple[str, ...] | None = None,
    source_timm: str | None = None,
) -> Conversion:
    prepared = prepare(source, target, catalog=catalog, model=model, ema=ema, prefixes=prefixes,
                       source_timm=source_timm)
    out = Path(output) if output else _default_output(prepared.ckpt, prepared.target_timm)
    return write_prepared(prepared, out)


def _json(value) -> str:
    return json.dumps(value, sort_keys=True)


def _default_output(ckpt: Checkpoint, timm_version: str) -> Path:
    stem = ckpt.path.name
    for suffix in (".safetensors", ".tar", ".pth", ".pt", ".bin", ".ckpt"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    # the current folder, never beside the source: a watched folder is read-only to cachectl
    return Path.cwd() / ("%s.timm-%s.safetensors" % (stem, timm_version))
