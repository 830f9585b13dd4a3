"""Plan and run one conversion: a checkpoint, made for the timm of one target, proven strict.

Plans are tried in order and the first whose result passes the strict check against
the target model wins: the file as it is, the project's migrations for the family, then
the target timm's own checkpoint filter. Each plan ends with the same two generic steps:
drop what the target no longer saves (non-persistent buffers), fill the deterministic
buffers it does save from a fresh target model.
"""
from __future__ import annotations

import concurrent.futures
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from . import __version__, migrations
from .catalog import Catalog, version_key
from .errors import NoPlanError, TargetError
from .identify import Tag, identify
from .layout import Layout
from .reader import Checkpoint, read
from .safetensors_io import write
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
                more = " and %d more" % (len(items) - limit) if len(items) > limit else ""
                parts.append("%s %s%s" % (label, ", ".join(items[:limit]), more))
        if self.shapes:
            shown = ["%s %s vs %s" % (k, list(a), list(b)) for k, a, b in self.shapes[:limit]]
            parts.append("shape %s" % "; ".join(shown))
        return "; ".join(parts)


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


@dataclass(frozen=True)
class _Attempt:
    name: str
    steps: tuple[str, ...]
    state: dict[str, torch.Tensor] = field(repr=False)
    mismatch: Mismatch


def strict_check(state: Mapping[str, torch.Tensor], layout: Layout) -> Mismatch:
    want = layout.specs
    missing = tuple(k for k in want if k not in state)
    unexpected = tuple(sorted(k for k in state if k not in want))
    shapes = tuple(
        (k, tuple(state[k].shape), want[k].shape) for k in want if k in state and tuple(state[k].shape) != want[k].shape
    )
    return Mismatch(missing, unexpected, shapes)


def target_model(tag: Tag, ckpt: Checkpoint, target: Target, catalog: Catalog, override: str | None) -> ModelChoice:
    """The name and kwargs to build in the target for this checkpoint."""
    best = tag.best
    names = [override] if override else _name_candidates(best.architecture, ckpt, catalog)
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


def _name_candidates(arch: str, ckpt: Checkpoint, catalog: Catalog) -> list[str]:
    """`arch`, its newer names (deprecation tables) and the older names that became it."""
    names = [arch]
    hint = ckpt.hints.architecture
    if hint and hint.split(".")[0] == arch and "." in hint:
        names.insert(0, hint)  # keep a pretrained tag the file names, e.g. from config.json
    for release in reversed(catalog.releases):
        table = catalog.deprecated(release)
        if arch in table and table[arch] not in names:
            names.append(table[arch])
        names += [old for old, new in table.items() if new.split(".")[0] == arch and old not in names]
    return names


def _finish(state: dict[str, torch.Tensor], spec: ModelSpec, target: Target, steps: list[str]) -> tuple[dict, list[str]]:
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


def _plans(ckpt: Checkpoint, spec: ModelSpec, target: Target) -> list[tuple[str, Callable[[], tuple[dict, list[str]]]]]:
    source = dict(ckpt.tensors)
    plans = [("as-is", lambda: (source, []))]
    applicable = migrations.applicable(spec.family, source, spec.layout.keys)
    if applicable:
        def migrate():
            state, steps = source, []
            for m, direction in applicable:
                state = (m.upgrade if direction == "upgrade" else m.downgrade)(state)
                steps.append("migration %s.%s (%s)" % (m.family, m.name, direction))
            return state, steps
        plans.append(("migrations", migrate))

    def own_filter():
        state, name = target.apply_filter(spec, source)
        if state is None:
            return None, ["target filter: %s" % name]
        return state, ["target timm %s filter %s" % (target.info().timm, name)]
    plans.append(("target filter", own_filter))
    return plans


def _refuse_math_changes(ckpt: Checkpoint, tag: Tag, spec: ModelSpec, target_timm: str) -> None:
    """NoPlanError when every release that makes this layout computes differently from the target."""
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
        mismatch = strict_check(state, spec.layout)
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


def prepare(
    source: str | Path | Checkpoint,
    target: Target,
    *,
    catalog: Catalog | None = None,
    model: str | None = None,
    ema: bool = False,
) -> Prepared:
    """Read, identify and plan; the result passed the strict check against the target."""
    catalog = catalog or Catalog.load()
    ckpt = source if isinstance(source, Checkpoint) else read(source, ema=ema)
    tag = identify(ckpt, catalog)
    choice = target_model(tag, ckpt, target, catalog, model)
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
    _refuse_math_changes(ckpt, tag, spec, target.info().timm)
    attempt = plan(ckpt, spec, target)
    return Prepared(ckpt, tag, choice, spec.layout.layout_id, target.info().timm, attempt)


def write_prepared(prepared: Prepared, output: Path, source_sha256: str | None = None) -> Conversion:
    """Write the planned result as safetensors with its provenance in the metadata."""
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
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        if source_sha256 is None:
            # hash the source on the other core while the output is written
            hashing = pool.submit(sha256_file, ckpt.weights)
            deferred = {"cachectl.source_sha256": hashing.result}
        else:
            metadata["cachectl.source_sha256"] = source_sha256
            deferred = None
        size = write(output, prepared.attempt.state, metadata, deferred=deferred, source=ckpt.weights, span=ckpt.span)
        digest = source_sha256 or hashing.result()
    return Conversion(
        source=ckpt.path, output=output, source_sha256=digest, source_timm_versions=tag.best.timm_versions,
        target_timm=prepared.target_timm, model=choice, steps=prepared.attempt.steps, tag=tag, size=size,
    )


def convert(
    source: str | Path,
    output: str | Path | None,
    target: Target,
    *,
    catalog: Catalog | None = None,
    model: str | None = None,
    ema: bool = False,
) -> Conversion:
    prepared = prepare(source, target, catalog=catalog, model=model, ema=ema)
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
