"""Swin v2: timm 0.9 moved each stage's patch merging from the end of a stage to the
start of the next (so `layers.0` lost its downsample and the last stage gained one) and
the classifier under `head.fc`; `attn_mask` stopped being saved (the planner drops or
fills it as the target wants). The math is unchanged, so a rename carries it both ways."""
import re

from . import Migration, register, rename


def _is_old(keys):
    # only the old layout downsamples in stage 0; head-less files decide by that alone
    return any(k.startswith("layers.0.downsample.") for k in keys) or "head.weight" in keys


def _shift(k, by):
    return re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: "layers.%d.downsample." % (int(m.group(1)) + by), k)


def _upgrade(state):
    return rename(state, lambda k: re.sub(r"^head\.", "head.fc.", _shift(k, 1)))


def _downgrade(state):
    return rename(state, lambda k: re.sub(r"^head\.fc\.", "head.", _shift(k, -1)))


register(Migration(("swin_transformer_v2",), "downsample-at-stage-start", _is_old, _upgrade, _downgrade))
