"""A state dict's layout: its keys and their shapes, and the ids that name it."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Iterable, Mapping


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Layout:
    """Keys in state-dict order with their shapes and dtypes.

    Its views are computed once per layout (a conversion asks for them a dozen times)."""

    tensors: tuple[tuple[str, TensorSpec], ...]

    @classmethod
    def from_specs(cls, specs: Mapping[str, TensorSpec]) -> "Layout":
        return cls(tuple(specs.items()))

    @classmethod
    def from_rows(cls, rows: Iterable) -> "Layout":
        return cls(tuple((k, TensorSpec(tuple(shape), dtype)) for k, shape, dtype in rows))

    def __getstate__(self) -> dict:
        return {"tensors": self.tensors}  # the cached views are remade, not pickled

    @cached_property
    def specs(self) -> Mapping[str, TensorSpec]:
        return MappingProxyType(dict(self.tensors))

    @cached_property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.tensors)

    @cached_property
    def layout_id(self) -> str:
        return layout_id((k, s.shape) for k, s in self.tensors)

    def without(self, prefixes: Iterable[str]) -> "Layout":
        prefixes = tuple(prefixes)
        return Layout(tuple((k, s) for k, s in self.tensors if not is_under(k, prefixes)))

    def rows(self) -> list:
        return [[k, list(s.shape), s.dtype] for k, s in self.tensors]


def is_under(key: str, prefixes: tuple[str, ...]) -> bool:
    """True when `key` is a prefix's own weight or bias (`head` covers `head.weight`)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def layout_id(pairs: Iterable[tuple[str, Iterable[int]]]) -> str:
    """Order-free id of (key, shape) pairs: dtype and key order do not change a layout."""
    lines = sorted("%s:%s" % (k, ",".join(str(d) for d in shape)) for k, shape in pairs)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:20]
