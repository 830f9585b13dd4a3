"""Vision Transformer: what changed between timm releases, beyond names and heads.

- timm 0.6 dropped the pre-logits layer (`pre_logits.fc`, a linear + tanh before the
  head) and its `representation_size` argument; 0.5.4 and earlier built it into four
  `*_in21k` models. 0.6+ filters the layer out of old files, which then load but
  compute something else, so such a file asks its target for the layer, and releases
  that cannot build it refuse. Files of 0.6+ have no pre-logits and go back as the
  plain model of the same layout (the `*_in21k` names there cannot drop the layer).
- timm 1.0 gave `vit_medium_patch16_reg4_gap_256` layer scale (`blocks.N.ls1/ls2.gamma`,
  init_values=1e-5); 0.9.16 built it without. Any release builds either one through
  `init_values`, so the target is built with the file's own choice.

Renames (0.9 made `*_in21k`, `*_dino`, `*_clip_laion2b` tags of a base name, hybrids
included) and default heads (0.9.2, 0.9.16, vitamin in 1.0.31) need no migration: the
planner follows deprecations and keeps the file's own number of classes.
"""
from . import Migration, register

# any truthy value builds LayerScale; the file's gammas overwrite it. 0 builds none
# (None would be dropped by timm.create_model and leave the model's default).
WITH_LAYER_SCALE, WITHOUT_LAYER_SCALE = 1e-5, 0
# The keys do not say the layer's width: releases that take the argument build every
# model that saved the layer with it already, so this only reaches those that cannot
# (a TypeError, hence a refusal) or a model picked by hand, where the strict shape
# check refuses a wrong width.
NEEDS_PRE_LOGITS = True


def _has_layer_scale(keys):
    return "blocks.0.ls1.gamma" in keys


def _has_pre_logits(keys):
    return "pre_logits.fc.weight" in keys


def _layer_scale_kwargs(source, target):
    if _has_layer_scale(source) == _has_layer_scale(target):
        return {}
    return {"init_values": WITH_LAYER_SCALE if _has_layer_scale(source) else WITHOUT_LAYER_SCALE}


def _pre_logits_kwargs(source, target):
    # without this, 0.6+ would take the file through its own filter, which drops the layer
    if _has_pre_logits(source) and not _has_pre_logits(target):
        return {"representation_size": NEEDS_PRE_LOGITS}
    return {}


register(
    Migration(("vision_transformer",), "layer-scale-follows-the-file", kwargs=_layer_scale_kwargs),
    Migration(("vision_transformer",), "pre-logits-follows-the-file", kwargs=_pre_logits_kwargs),
)
