"""VoVNet: `ese_vovnet39b_evos` normalises with EvoNorm-S0, whose group count defaults
to 8 up to timm 0.4.12 and to 32 from 0.5, with no argument of the model to choose it.
0.5 also saved the EvoNorm parameters as `(C,)` instead of `(1, C, 1, 1)`, a reshape
only; the groups are what no weights can carry across."""
from . import MathChange, register_math_change

register_math_change(MathChange(
    ("vovnet",), lambda name: name == "ese_vovnet39b_evos", "0.1.0", "0.4.12",
    "up to timm 0.4.12 its EvoNorm-S0 layers use 8 groups, later releases 32",
))
