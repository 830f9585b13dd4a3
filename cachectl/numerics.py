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
"""
from __future__ import annotations

import os
from typing import Mapping

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pinned(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the kernels pinned, for a process about to start."""
    return {**env, **PINNED}


def pin() -> None:
    """Pin this process's kernels: call before torch runs anything."""
    os.environ.update(PINNED)
