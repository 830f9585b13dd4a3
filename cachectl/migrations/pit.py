"""PiT: timm 0.9 moved each pooling layer from the end of a transformer stage to the
start of the next (`transformers.S.pool` -> `transformers.S+1.pool`), same math.

Distilled models also changed math with no change of keys: timm 0.9.0 to 1.0.24 feed
the class token to both heads (`x_dist = head_drop(x)`), 0.6.13 and earlier and 1.0.25 on
feed the distillation token to `head_dist` (found by the fingerprints of 1.0.22, 1.0.23
and 1.0.25; the source of 1.0.24 has the same line as 1.0.23's). Weights cannot make one compute the other,
and files written by either side of that bug have the same keys."""
import re

from . import MathChange, Migration, register, register_math_change, rename


def _is_old(keys):
    # stage 0 pools only in the old layout
    return any(k.startswith("transformers.0.pool.") for k in keys)


def _shift(k, by):
    return re.sub(r"^transformers\.(\d+)\.pool\.", lambda m: "transformers.%d.pool." % (int(m.group(1)) + by), k)


def _upgrade(state):
    return rename(state, lambda k: _shift(k, 1))


def _downgrade(state):
    return rename(state, lambda k: _shift(k, -1))


register(Migration(("pit",), "pool-at-stage-start", _is_old, _upgrade, _downgrade))
register_math_change(MathChange(("pit",), lambda name: "distilled" in name, "0.9.0", "1.0.24",
                                 "its head_dist reads the class token in timm 0.9.0 to 1.0.24"))
