"""Swin (v1): timm 0.9 moved each stage's downsample to the start of the next stage and
the classifier under `head.fc`; relative position indices and attention masks stopped
being saved (the planner drops or fills those as the target wants)."""
import re

from . import Migration, register, rename


def _is_old(keys):
    # stage 0 only has a downsample in the old layout; head-less files decide by this too
    return any(k.startswith("layers.0.downsample.") for k in keys) or "head.weight" in keys


def _shift(k, by):
    k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: "layers.%d.downsample." % (int(m.group(1)) + by), k)
    return k


def _upgrade(state):
    return rename(state, lambda k: re.sub(r"^head\.", "head.fc.", _shift(k, 1)))


def _downgrade(state):
    return rename(state, lambda k: re.sub(r"^head\.fc\.", "head.", _shift(k, -1)))


register(Migration(("swin_transformer",), "downsample-at-stage-start", _is_old, _upgrade, _downgrade))
