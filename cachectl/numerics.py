"""The CPU kernels that fingerprints are taken and compared with: the same on every x86 machine.

torch and oneDNN pick their kernels by the CPU, and AVX-512 ones sum in another order than
AVX2 ones. Most models end 1e-7 apart for it, but those whose activations grow large on
generated weights (visformer, repvit, efficientvit, resnest200e) end 1e-5 to 3e-3 apart, on
the same release and the same weights: more than FINGERPRINT_RTOL, so one release
fingerprinted on an AVX-512 machine read as 13 models changing their math and changing it
back. Pinned to AVX2, an AVX-512 machine reproduces the shipped fingerprints, which were
made where AVX2 was the best, to 1e-9.

Both libraries read these once, before their first operation, so they are set where a
process starts: the fingerprint dumps and the target agents (their environment), the
`cachectl` and `cachectld` commands and the test suite (`pin()`). Never on `import
cachectl`: a user's own process (the Python API inside a training script) keeps its fastest
kernels, and a proof run in it compares at the kernels it has.

Only where the CPU has AVX2: torch takes ATEN_CPU_CAPABILITY=avx2 without checking (an x86
CPU without AVX2 would stop on an illegal instruction), and warns on every start where it
does not know the value (ARM). Elsewhere nothing is pinned, and a proof that then disagrees
with the shipped fingerprints refuses; it never accepts.
"""
from __future__ import annotations

import functools
import os
from typing import Mapping

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@functools.lru_cache(maxsize=None)
def _pinned(cpuinfo: str = "/proc/cpuinfo") -> dict[str, str]:
    """AVX2 where this CPU has it (Linux says so in /proc/cpuinfo), else nothing."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return AVX2 if "avx2" in line.split() else {}
    except OSError:
        pass
    return {}


def pinned(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the kernels pinned, for a process about to start."""
    return {**env, **_pinned()}


def pin() -> None:
    """Pin this process's kernels: call before torch runs anything."""
    os.environ.update(_pinned())
