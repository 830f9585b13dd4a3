"""Names and places that need no torch: shared by the library and the daemon's watcher,
which keeps torch out of its own process."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

# What a checkpoint file is called.
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".pth.tar", ".ckpt")
# The weights of a Hugging Face snapshot folder, in the order they are preferred.
SNAPSHOT_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def default_root(environ: Mapping[str, str] = os.environ) -> Path:
    """The cache's folder: $CACHECTL_ROOT, else the platform's user data folder."""
    if environ.get("CACHECTL_ROOT"):
        return Path(environ["CACHECTL_ROOT"])
    import platformdirs  # imported only when asked: inspect and --help never need it

    return Path(platformdirs.user_data_dir("cachectl"))
