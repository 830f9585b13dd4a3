"""PoolFormer (v1): timm 0.9 moved it from the `poolformer` module into `metaformer`
(`patch_embed`/`network.N` became `stem`/`stages.S`, `layer_scale_1` became
`layer_scale1.scale`, `norm`/`head` became `head.norm`/`head.fc`) and changed its head
with it: up to 0.6.13 the final feature map is normalized by GroupNorm1 (statistics
over channels and positions) and then averaged; from 0.9 it is averaged first and the
pooled vector normalized by LayerNorm2d (statistics over channels, eps 1e-6). The
pooled vector has lost the positions the old statistics need, so no weights make one
head compute the other's outputs, and timm's own filter, which loads 0.6.13 files,
gives different outputs. Files are refused across the change instead of renamed."""
from . import MathChange, register_math_change


def _is_poolformer_v1(name):
    return name.startswith("poolformer_")  # not poolformerv2_*, born in metaformer


register_math_change(MathChange(
    ("poolformer", "metaformer"), _is_poolformer_v1, "0.6.0", "0.6.13",
    "up to timm 0.6.13 its head normalizes the feature map before pooling (GroupNorm1), "
    "from 0.9 the pooled features (LayerNorm2d)",
))
