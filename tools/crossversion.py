"""Make a checkpoint under one real timm release, load and run it under another.

Shared by the test suite (tests/conftest.py) and the cross-version matrix (tools/matrix.py).
Checkpoints and their reference outputs are made by the real releases in subprocesses
(tests/release_script.py) and cached under .cache/test-artifacts, keyed by release,
model, kwargs and format, so a second run pays only for conversions.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tools.timm_releases import ROOT, release_dir

SCRIPT = ROOT / "tests" / "release_script.py"
ARTIFACTS = Path(os.environ.get("CACHECTL_TEST_ARTIFACTS", ROOT / ".cache" / "test-artifacts"))
INSTALLED = "installed"  # the timm beside cachectl, as opposed to a release folder
LOW_DISK = 1 << 30  # bytes: with less free where a release writes, a failed save is most likely the disk
# Outputs must match to float32 round-off: conversions move tensors, they never change them.
ATOL = 1e-5


def python_for(version: str) -> Path:
    """An interpreter that imports timm==version first: what an old environment looks like."""
    if version == INSTALLED:
        return Path(sys.executable)
    folder = ARTIFACTS / "envs" / version / "bin"
    wrapper = folder / "python"
    if not wrapper.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (".python.%d" % os.getpid())
        tmp.write_text('#!/bin/sh\nPYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}" exec "%s" "$@"\n' % (release_dir(version), sys.executable))
        tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        tmp.replace(wrapper)
    return wrapper


def _run(version: str, *args: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([str(python_for(version)), str(SCRIPT), *args], capture_output=True, text=True, cwd=ARTIFACTS)
    if proc.returncode != 0:
        raise AssertionError("timm %s: %s failed%s:\n%s" % (version, " ".join(args[:2]), _disk_full(args), proc.stderr[-3000:]))


def _disk_full(args: tuple[str, ...]) -> str:
    """Why a release's write failed when the disk is the cause (torch says only `iostream error`)."""
    for folder in [ARTIFACTS] + [Path(a).parent for a in args if Path(a).is_absolute()]:
        while not folder.exists():
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if free < LOW_DISK:
            return (", most likely because the disk is full: %d MB free in %s (README, Testing, says how much "
                    "the suite needs)" % (free >> 20, folder))
    return ""


@dataclass(frozen=True)
class Made:
    path: Path
    logits: torch.Tensor
    timm: str


def make_checkpoint(version: str, model: str, kwargs: dict | None = None, fmt: str = "pth") -> Made:
    """A checkpoint of `model` saved by timm==version (random weights), and its outputs."""
    kwargs = kwargs or {}
    key = hashlib.sha256(json.dumps([model, kwargs, fmt, SCRIPT.read_bytes().hex()]).encode()).hexdigest()[:12]
    folder = ARTIFACTS / "made" / version
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".safetensors" if fmt == "safetensors" else ".pth"
    path = folder / ("%s-%s%s" % (model, key, suffix))
    logits = folder / ("%s-%s.logits" % (model, key))
    if not logits.exists():
        _run(version, "make", model, str(path), str(logits), json.dumps(kwargs), "--format", fmt)
    ref = torch.load(logits, weights_only=True)
    return Made(path, ref["logits"], ref["timm"])


def run_in(version: str, model: dict, weights: Path, tmp_path: Path) -> torch.Tensor:
    """Outputs of `model` ({"name", "kwargs"}) in timm==version after a strict load of weights."""
    out = tmp_path / ("run-%s.logits" % version)
    _run(version, "run", model["name"], json.dumps(model["kwargs"]), str(weights), str(out))
    return torch.load(out, weights_only=True)["logits"]
