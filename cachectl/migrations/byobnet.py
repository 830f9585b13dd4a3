"""BYOBNet: timm 0.5 rebuilt its attention nets (botnet26t_256, halonet26t, ...) with other
depths and attention widths under the same names: other nets, other keys, nothing to map.

Its global-context nets (gcresnet50t, gcresnext26ts, ...) normalise the context with
LayerNorm2d, whose eps is 1e-5 up to timm 0.5.4 and 1e-6 from 0.6; no weights make one
compute the other. (0.5 also saved that norm's parameters as `(C,)` instead of
`(C, 1, 1)`; reshaping 0.4.12 files for 0.5.4 alone is not offered, because a `(C,)`
file cannot say whether 0.5.4 or 0.6+ made it, and a 0.6+ file would then reach 0.4.12
computing differently.)"""
from . import MathChange, register_math_change

register_math_change(MathChange(
    ("byobnet",), lambda name: name.startswith("gc"), "0.1.0", "0.5.4",
    "up to timm 0.5.4 the LayerNorm2d of its global-context blocks uses eps 1e-5, later releases 1e-6",
))
