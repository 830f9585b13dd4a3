"""A conversion's math, proven by running it.

The catalog keeps what each model of each release computes from generated weights on a
fixed input (cachectl/_fingerprint.py), taken when the catalog is built. Those same
weights, laid out as the release that made a file lays them, go through the conversion's
own plan; the target timm runs the result on the same input. Equal numbers prove the plan
and the target together compute what the source release computed, where the catalog
cannot compare the two by itself: across a migration, with kwargs the catalog's
fingerprints were not taken with, or for a target release the catalog does not hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ._fingerprint import DERIVED_BUFFERS, MAX_PARAMS, METHOD, generated_tensor, weights_id
from .catalog import Fingerprint
from .layout import Layout


@dataclass(frozen=True)
class SourceWeights:
    """The generated weights of one (model, release) entry, in that release's layout."""

    tensors: Mapping[str, torch.Tensor]
    weights: str  # the id _fingerprint.fill() gives them: equal to the fingerprint's when rebuilt right


def unprovable(layout: Layout, fp: Fingerprint) -> str | None:
    """Why a run cannot prove this entry's math (None: it can be tried)."""
    if fp.method != METHOD:
        return "%s of timm %s was fingerprinted by another method (%d, this cachectl runs %d)" % (
            fp.name, fp.release, fp.method, METHOD)
    params = 0
    for _, spec in layout.tensors:
        n = 1
        for s in spec.shape:
            n *= s
        params += n
    if params > MAX_PARAMS:
        return "%s has %d values, above the %d a proof runs" % (fp.name, params, MAX_PARAMS)
    return None


def source_weights(layout: Layout, as_built: Mapping[str, torch.Tensor]) -> SourceWeights:
    """Every entry of `layout` as the fingerprint gave it: generated floats, and the rest
    (integer counters, tables a model derives from its configuration) from `as_built`
    where it has the key at that shape, else zeros. A rebuilt entry whose `weights` differs
    from its fingerprint's (tied parameters, a table that is a parameter) proves nothing."""
    tensors, generated = {}, []
    for key, spec in layout.tensors:
        dtype = getattr(torch, spec.dtype)
        leaf = key.rsplit(".", 1)[-1]
        if dtype.is_floating_point and leaf not in DERIVED_BUFFERS:
            tensors[key] = generated_tensor(key, spec.shape).to(dtype)
            generated.append("%s:%s" % (key, ",".join(str(int(s)) for s in spec.shape)))
        elif key in as_built and tuple(as_built[key].shape) == tuple(spec.shape):
            tensors[key] = as_built[key].to(dtype)
        else:
            tensors[key] = torch.zeros(spec.shape, dtype=dtype)
    return SourceWeights(tensors, weights_id(generated))


def as_fingerprint(summary: Mapping, release: str, name: str, source: Fingerprint) -> Fingerprint:
    """The target's run, as a fingerprint comparable with the source's (same weights, input)."""
    return Fingerprint(
        release=release, name=name, method=METHOD, weights=source.weights, input=source.input,
        shape=tuple(int(s) for s in summary["shape"]), total=float(summary["sum"]),
        abs_total=float(summary["abs"]), values=tuple(float(v) for v in summary["values"]),
    )
