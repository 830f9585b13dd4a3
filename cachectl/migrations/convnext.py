"""ConvNeXt: in timm 0.5.4 its own LayerNorm2d normalises a non-contiguous input (every
downsample norm after a stage of channels-last blocks, and `convnext_tiny_hnf`'s
`norm_pre`) with `torch.var_mean`, whose variance is unbiased; from 0.6 every path
uses the biased variance of `F.layer_norm`. No weights make one compute the other.

0.6 also made `convnext_tiny_hnf` default to `conv_mlp=True` (MLP weights saved as 1x1
convs, `(out, in, 1, 1)`, instead of linears, `(out, in)`); its 0.5.4 layout is its
own, so such files are refused by the change above. The other 0.5.4 models keep the
keys and shapes of later releases, so a file cannot say whether 0.5.4 made it and is
converted as it is."""
from . import MathChange, register_math_change

register_math_change(MathChange(
    ("convnext",), lambda name: True, "0.5.0", "0.5.4",
    "up to timm 0.5.4 its LayerNorm2d uses the unbiased variance on non-contiguous inputs "
    "(the downsample norms), later releases the biased one",
))
