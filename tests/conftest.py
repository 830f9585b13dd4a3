"""Shared fixtures: real timm releases side by side, checkpoints they made, and targets."""
from __future__ import annotations


import pytest

from cachectl.target import Target
from tools.crossversion import ATOL, INSTALLED, make_checkpoint, python_for, run_in  # noqa: F401  (used by tests)

@pytest.fixture(scope="session")
def targets():
    """Target(version) for each release, one long-lived agent each for the whole session."""
    opened: dict[str, Target] = {}

    def get(version: str) -> Target:
        if version not in opened:
            opened[version] = Target(None if version == INSTALLED else python_for(version))
        return opened[version]

    yield get
    for t in opened.values():
        t.close()


@pytest.fixture
def roundtrip(targets, tmp_path):
    """Make `model` in `src`, convert it for `dst`, run it there: (conversion, max |diff|)."""
    from cachectl.convert import convert

    def go(model: str, src: str, dst: str, kwargs: dict | None = None, fmt: str = "pth"):
        made = make_checkpoint(src, model, kwargs, fmt)
        result = convert(made.path, tmp_path / ("%s-for-%s.safetensors" % (model, dst)), targets(dst))
        got = run_in(dst, {"name": result.model.name, "kwargs": dict(result.model.kwargs)}, result.output, tmp_path)
        assert got.shape == made.logits.shape
        return result, (got - made.logits).abs().max().item()

    return go
