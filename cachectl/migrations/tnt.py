"""TNT: timm 1.0.20 fixed the pixel-to-patch projection (unfold before the stem conv,
a layer norm over the whole flattened patch `blocks.N.norm1_proj` of dim*pixels, a
bias-free `proj` and a new `norm2_proj`) and kept the old math behind `legacy=True`.
A file from 1.0.15 or earlier loads into 1.0.20+ built with `legacy=True`; a file of
the new math has no counterpart before 1.0.20, so it cannot go back."""
from . import Migration, register


def _is_legacy(keys):
    # only the old projection has a bias
    return "blocks.0.proj.bias" in keys


def _kwargs(source, target):
    if _is_legacy(source) and not _is_legacy(target):
        return {"legacy": True}
    return {}


register(Migration(("tnt",), "legacy-projection", kwargs=_kwargs))
